"""Running an experiment: typed config, the rules that derive settings from the data, assembly of
data, process and network, the training loop, checkpoints, distributed training and the
machine description.
"""
