"""Everything a run keeps in its workdir, and the one file layer it goes through (local or gs:// alike).

storage.py (whole-file writes, append-only files, exclusive creation), layout.py (every file and folder name),
config_file.py (config.json, its history, the closing summary), run_lock.py (one run per workdir), checkpoint.py
(Orbax saves and honest restores) and resume.py (what a relaunch may change). Nothing here is imported by the package
at import time: each module is asked for where it is needed.
"""
