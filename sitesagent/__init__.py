"""The site agent: trains the federation's model next to a hospital's scans.

Importing this package must stay cheap (no torch, no MONAI) so that the command line answers
``--help`` at once; the heavy modules import torch themselves when they are first used.
"""

__version__ = "0.1.0"
