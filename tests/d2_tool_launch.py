"""Run one of detectron2's own tools (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``) in tests.

What a user's copy of ``train_net.py`` adds, done here around the script: the README's hook line
(``AlphaCLIPTrainer`` as ``DefaultTrainer``, ...), read from README.md and inserted after the script's imports,
and the tiny synthetic COCO set registered as ``$ALPHACLIP_TEST_COCO`` (``name,instances.json,image_dir``).
``lazyconfig_train_net.py`` runs unchanged. The script runs in this module's namespace, so that the processes
detectron2's ``launch`` spawns for ``--num-gpus N`` (they re-import the parent's ``__main__``, this file)
register the set and define the script's ``main`` again before they unpickle it.
Usage: ``python tests/d2_tool_launch.py SCRIPT ARGS...``.
"""
import os
import sys
from pathlib import Path

from detectron2.data.datasets import register_coco_instances

README = Path(__file__).resolve().parent.parent / "README.md"
HOOK = "from alphaclip_plugins.integrations.detectron2 import AlphaCLIPTrainer as DefaultTrainer"


def _hooked_source(script: Path) -> str:
    """``script``'s source, with the README's hook line before its first top-level ``def``/``class``
    when the script builds a ``DefaultTrainer``."""
    lines = script.read_text().splitlines(keepends=True)
    if not any("DefaultTrainer" in line for line in lines):
        return "".join(lines)
    (hook,) = [line for line in README.read_text().splitlines() if line.startswith(HOOK)]
    at = next(i for i, line in enumerate(lines) if line.startswith(("def ", "class ")))
    return "".join(lines[:at] + [hook + "\n"] + lines[at:])


if __name__ in ("__main__", "__mp_main__"):  # __mp_main__: a process spawned by detectron2's launch
    name, json_file, image_root = os.environ["ALPHACLIP_TEST_COCO"].split(",")
    register_coco_instances(name, {}, json_file, image_root)
    if __name__ == "__main__":
        sys.argv = sys.argv[1:]
        os.environ["ALPHACLIP_TEST_SCRIPT"] = sys.argv[0]  # spawned processes inherit the environment
    script = Path(os.environ["ALPHACLIP_TEST_SCRIPT"])
    exec(compile(_hooked_source(script), str(script), "exec"), globals())
