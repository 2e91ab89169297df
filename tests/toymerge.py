"""The test-only ``toymerge`` stage (one job), see toystage.Merge."""
from toystage import Merge

add_arguments = Merge.add_arguments
overrides = Merge.overrides
unit = Merge.unit
plan = Merge.plan
run_shard = Merge.run_shard
report = Merge.report
