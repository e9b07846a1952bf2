"""Per-run services, below the task kinds and above the loop: the run context (accelerator, seeds, derived values,
run directory, resume point, resolved config), the lineage every export records, and a run's recipe and structure.

    ctx = start_run(recipe, command)      # accelerator, seed, derived values, RUN_DIR/config.yaml, lock
    state = ctx.fit(module, loader, normalize)
    lineage(recipe, state, manifests, stage, objective, parent)
"""

from medfound.run.context import RunContext, has_accelerator, start_run
from medfound.run.lineage import (backbone_structure, dataset_record, lineage, load_run_recipe, parent_lineage,
                                  read_run)

__all__ = ["RunContext", "has_accelerator", "start_run", "backbone_structure", "dataset_record", "lineage",
           "load_run_recipe", "parent_lineage", "read_run"]
