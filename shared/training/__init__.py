"""Training and evaluation: `plantsight train`, `plantsight eval`, metrics and plots.

Import the parts you need (`shared.training.train`, `.evaluate`, `.metrics`); this package itself
imports nothing heavy, so the command line starts without torch.
"""
