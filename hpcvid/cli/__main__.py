"""`python -m hpcvid.cli`: the same as the `hpcvid` console script."""
from hpcvid.cli import entry_point

entry_point()
