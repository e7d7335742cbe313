"""Names of the attributes mergeopt keeps in Optuna studies and trials: one place for each key.

Study user_attrs are visible in optuna-dashboard, so everything a person may want to read
(the spec, the block layout, block importance, anchor scores) lives there as JSON. Keys are
namespaced with ``mergeopt:`` so they never collide with a user's own attributes.
"""

from __future__ import annotations

PREFIX = "mergeopt:"

# Study user_attrs
SPEC = PREFIX + "spec"  # the validated study spec, as JSON-compatible dict
SPEC_PATH = PREFIX + "spec_path"  # where the spec was read from (for messages only)
GENOME = PREFIX + "genome"  # Genome.to_dict(): blocks, experts, searched bounds
LAYOUT = PREFIX + "layout"  # BlockLayout.to_dict()
BLOCK_IMPORTANCE = PREFIX + "block_importance"  # list[float] in [0, 1], one per block
PARAM_NAMES = PREFIX + "param_names"  # the searched trial parameters, in genome order
ANCHORS = PREFIX + "anchors"  # objective scores of the base and each expert (normalization)
CREATED_WITH = PREFIX + "version"

# Study system_attrs
# The folder `study plot` attached the plots in, so that `study run` can refresh them there.
ARTIFACT_DIR = PREFIX + "artifact_dir"

# Trial user_attrs
RECIPE = PREFIX + "recipe"  # per-block, per-expert merge parameters of the trial
METRICS = PREFIX + "metrics"  # raw per-task metrics before normalization
MERGE_SECONDS = PREFIX + "merge_seconds"
LOAD_SECONDS = PREFIX + "load_seconds"
EVAL_SECONDS = PREFIX + "eval_seconds"
WORKER = PREFIX + "worker"  # host:pid/device of the worker that ran the trial
FAIL_REASON = PREFIX + "fail_reason"
# Closed unevaluated (surplus, interrupted, taken over, lost ask): not a failed candidate; the
# candidate was requeued or never needed. Status counts these apart from failures.
GIVEN_BACK = PREFIX + "given_back"
SEED = PREFIX + "seed"  # the merge seed of the trial (random masks of dare_*/della*)
# Evaluation cost of the trial's search evaluation (EVAL_SECONDS is its time). A later
# fidelity change adds what it skipped beside these, so totals can say the fraction saved.
ITEMS_SCORED = PREFIX + "items_scored"  # task items the model answered or was scored on
TOKENS_GENERATED = PREFIX + "tokens_generated"  # tokens generated over those items

# Held-out evaluation (`mergeopt study evaluate NAME --heldout`), written onto COMPLETE trials.
# Re-evaluating a trial overwrites these keys (same merge, same seed, greedy decoding: the
# values come out identical; the cost is that of the latest evaluation, never summed twice).
HELDOUT_VALUES = PREFIX + "heldout_values"  # objective name -> value on the held-out split
HELDOUT_METRICS = PREFIX + "heldout_metrics"  # raw per-task metrics on the held-out split
HELDOUT_SEED = PREFIX + "heldout_seed"  # the merge seed used: the trial's SEED
HELDOUT_COST = PREFIX + "heldout_cost"  # {"items_scored", "tokens_generated", "eval_seconds"}
# Study user_attrs: anchors (see ANCHORS) measured on the held-out split, for normalize: true
HELDOUT_ANCHORS = PREFIX + "heldout_anchors"
