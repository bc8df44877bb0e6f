"""The embedded main job (``ihgrpo demo``): a tiny model learns delayed tool use on CPU.

Importing this package registers its named sources (:mod:`ihgrpo.registry`), so that the core
resolves ``demo`` without knowing the demo: ``model.path: demo`` (the cached SFT start),
``data.train: demo`` (also ``demo:train``, ``demo:heldout``) and ``ihgrpo eval --benchmark demo``.
Only strings are registered here: nothing heavy is imported until a name is used.
"""

from ihgrpo import registry

registry.register("model", "demo", "ihgrpo.demo.pipeline:sft_start")
for _name in ("demo", "demo:train", "demo:heldout"):
    registry.register("dataset", _name, "ihgrpo.demo.sources:examples")
registry.register("benchmark", "demo", "ihgrpo.demo.sources:heldout_benchmark")
