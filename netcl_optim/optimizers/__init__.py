"""The optimizers, one file per family: each holds the functional alias (a chain of the
building blocks in :mod:`netcl_optim.transforms`, with the full maths in its docstring), the
torch-named stateful class (a declaration: see :class:`netcl_optim.stateful.Optimizer`) and
torch's keys for the states it keeps. Their public names are exported by :mod:`netcl_optim`
(and the classes by :mod:`netcl_optim.stateful`)."""
