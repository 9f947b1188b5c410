"""The settings a recipe gets for every knob it leaves out — one place, read by the recipe
loader and the engine alike (no torch here).

They are product decisions, chosen by measurement: the sweep over the `tune` half of the
held-out task suite (``python examples/task_suite.py --split tune --sweep``,
``results/sweep.md``) and checked on the other half (``python examples/task_suite.py``,
``results/suite.md``). Change one only with a rerun of both.
"""

COMPONENTS = ("vector", "matrix")
SOLVERS = ("independent", "joint")

SOLVER = "joint"  # the independent solve (the paper's) never learns where an answer stops
RHO = 0.3  # relative to the mean non-zero eigenvalue (solve.ridge_solve)
BATCHES = 1  # one batch, step η = 1/batches = 1
SEED = 0
