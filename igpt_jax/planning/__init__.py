"""--mode=compile: does the configured training step fit a TPU topology, and how fast should it run? From any host.

The real train step (steps.make_train_step, the one training compiles) is lowered for the abstract devices of
`config.compile.topology` (hardware.topology_devices; libtpu compiles for TPU on a CPU host), on the configured mesh,
with the state's and the batch's shapes from the config: no data set is opened, no array is allocated, nothing is
written outside the workdir. XLA's memory analysis is what an out-of-memory error would see; its cost analysis gives
FLOPs and bytes per device, which a roofline turns into a step time, tokens/s and MFU.

- compiled.py: a config as compiled for a target (its mesh built once, `auto` attention resolved for the target's
  platform), the compile, its memory and its per-device cost;
- report.py: the report (memory, fit, XLA's and the analytic FLOPs, roofline), its table and the verdict;
- search.py: `config.compile.search=True`, remat policies x microbatches x mesh splits ranked;
- mode.py: the mode, under the workdir's lock: compile.json, a metrics row, the table, exit status 3 when nothing
  fits.
"""
