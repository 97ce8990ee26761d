"""The words the engine accepts for its options, in one place.

The network and the kernels check their arguments against these, and FitConfig imports them
to check a config before any work starts; so a word the engine learns is one the config
accepts. Plain tuples with no imports: `import convtrain.config` must stay cheap (it runs for
`convtrain --help`), so it must not load the compiled kernels to read them.
"""

CONV_ALGOS = ("im2col", "winograd")  # what a conv layer computes with; "auto" chooses among these
GLOBAL_POOLS = ("none", "avg")  # after the last conv block
POOL_TYPES = ("max", "avg")  # in the conv blocks that pool
