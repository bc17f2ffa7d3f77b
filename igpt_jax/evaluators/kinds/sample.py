"""Samples, as an evaluator: config.evals.<name> of kind 'sample'.

Two PNG grids per step in `<name>/` (the default evaluator is `samples`): `step_<N>.png`, `num_images` unconditional
samples, and `step_<N>_completions.png`, the paper's layout for the eval split's first `completion_images` images (or
the files the `prompts` glob names, each resized to the model's side and quantized with the run's palette):
the given top `completion` of the rows (the rest grey) | `completions_per_image` completions | the original. Both go to
TensorBoard as images at their training step; the metrics row gives images per second, compilation left out. The
sampler is compiled at the first draw and kept for the run's later ones.
"""

from __future__ import annotations

import math
import time

import ml_collections
import numpy as np

from igpt_jax import defaults, runtime, sampling
from igpt_jax.data import sources, splits
from igpt_jax.evaluators import base


class Evaluator:
    """config.evals.<name> of kind 'sample'."""

    def __init__(self, name: str, entry: ml_collections.ConfigDict, rt: runtime.Runtime):
        self.name, self.entry, self.rt = name, entry, rt
        self.n_free = entry.num_images
        self.prompt_files = sampling.prompt_files(entry.prompts) if entry.prompts else None
        originals = entry.completion_images if self.prompt_files is None else len(self.prompt_files)
        self.n_completed = originals * entry.completions_per_image
        self.batch = sampling.batch_size(rt.config, rt.mesh, max(self.n_free, self.n_completed), entry.batch_size)
        self.progress: sampling.Progress | None = None  # the current draw's bar, fed by the compiled sampler
        self._sampler: sampling.Sampler | None = None

    def _position(self, i) -> None:
        if self.progress is not None:
            self.progress.position(i)

    def data_problems(self) -> list[str]:
        where = f"config.evals.{self.name}.prompts"
        if self.prompt_files is not None:
            if not self.prompt_files:
                return [f"{where}={self.entry.prompts!r} matches no file"]
            if self.rt.clusters is None:
                return [f"{where}: completing image files needs a palette, and this run's tokens have none"]
            return []
        if not self.entry.completion_images:
            return []
        problem = sources.split_problem(self.rt.source, "config.data.eval_split", splits(self.rt.config)[1])
        return [problem] if problem else []

    def sampler(self) -> sampling.Sampler:
        if self._sampler is None:
            config, clusters = self.rt.config, self.rt.clusters
            num_colours = config.model.vocab_size if clusters is None else len(clusters)
            self._sampler = sampling.make_sampler(
                self.rt.setup, self.batch, top_k=self.entry.top_k, num_colours=num_colours, progress=self._position
            )
        return self._sampler

    def run(self, params, step: int, stop: base.StopCheck) -> base.Result:
        calls = math.ceil(self.n_free / self.batch) + math.ceil(self.n_completed / self.batch)
        self.progress = sampling.Progress(calls, defaults.tokens_per_image(self.rt.config), f"{self.name} {step}")
        compiled = self.sampler().compiled is not None
        start = time.perf_counter()
        try:
            grids = self.draw(params, step, stop)
        finally:
            self.progress.close()
            self.progress = None
        compile_seconds = 0.0 if compiled else self.sampler().compile_seconds
        seconds = time.perf_counter() - start - compile_seconds
        files = {f"{self.name}/{file}": png for file, png in grids.items()}
        paths = [str(self.rt.directory / path) for path in files]
        e = self.entry
        images = self.n_free + self.n_completed
        row = {
            "mode": "sample",
            "evaluator": self.name,
            "step": step,
            "images": images,
            "images_per_sec": images / max(seconds, 1e-9),
            "seconds": seconds,
            "compile_seconds": compile_seconds,
            "batch": self.batch,
            "temperature": e.temperature,
            "top_k": e.top_k,
            "seed": e.seed,
            "completion": e.completion if self.n_completed else 0.0,
            "files": paths,
        }
        line = f"{self.name} step {step}: {images} images at {row['images_per_sec']:.2f} images/s -> "
        tags = {file: f"{self.name}/{'completions' if 'completions' in file else 'unconditional'}" for file in grids}
        pictures = {tags[file]: png for file, png in grids.items()}
        return base.Result(row, line + ", ".join(paths), files=files, images=pictures, shown=paths)

    def draw(self, params, step: int, stop: base.StopCheck) -> dict[str, bytes]:
        """{file name: PNG}: the entry's grids drawn from `params`."""
        config, clusters, e = self.rt.config, self.rt.clusters, self.entry
        side, length, vocab = config.model.image_size, defaults.tokens_per_image(config), config.model.vocab_size
        given_rows = round(e.completion * side)
        draws = (self.sampler(), params)
        grids = {}
        if self.n_free:
            prompts = np.zeros((self.n_free, length), np.int32)
            ids = np.arange(self.n_free)
            tokens = sampling.generate(*draws, prompts, 0, ids, e.seed, e.temperature, self.progress, stop)
            grids[f"step_{step:08d}.png"] = sampling.unconditional_grid(sampling.render(tokens, clusters, vocab))
        if self.n_completed:
            if self.prompt_files is None:
                originals = sampling.held_out_tokens(config, self.rt.source, clusters, e.completion_images)
            else:
                originals = sampling.prompt_tokens(self.prompt_files, side, clusters)
            prompts = np.repeat(originals, e.completions_per_image, axis=0)
            ids = sampling.COMPLETION_IDS + np.arange(len(prompts))
            given = given_rows * side
            tokens = sampling.generate(*draws, prompts, given, ids, e.seed, e.temperature, self.progress, stop)
            pictures = sampling.render(np.concatenate([originals, tokens]), clusters, vocab)
            grids[f"step_{step:08d}_completions.png"] = sampling.completion_grid(
                pictures[: len(originals)], pictures[len(originals) :], given_rows
            )
        return grids
