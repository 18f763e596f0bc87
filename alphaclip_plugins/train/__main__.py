"""``python -m alphaclip_plugins.train CONFIG.yaml [key=value ...]`` (also the torchrun entry point)."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
