"""The test-only ``toymerge`` stage (a run_local stage), see toystage.Merge."""
from toystage import Merge

HELP = Merge.HELP
add_arguments = Merge.add_arguments
overrides = Merge.overrides
run_local = Merge.run_local
