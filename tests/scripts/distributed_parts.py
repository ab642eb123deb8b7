"""Run under torchrun by tests/test_distributed.py: the distributed module's counting and gathering on real ranks.

Rank 0 writes what every rank computed together to the .npz given as the only argument.
"""

import dataclasses
import sys

import numpy as np
import torch

from datadiet_nb import presets
from datadiet_nb.data import normalize
from datadiet_nb.distributed import evaluate, gather, init, part, sharded_scores
from datadiet_nb.experiment import load_dataset, seeded_model
from datadiet_nb.scores import SCORE_FUNCTIONS

NUM_TEST = 101  # not a multiple of the 2 or 3 ranks the test starts
NUM_SCORED = 97

shard, device = init("cpu")
preset = presets.get("digits")
dataset = load_dataset(preset)
dataset = dataclasses.replace(dataset, test_images=dataset.test_images[:NUM_TEST],
                              test_labels=dataset.test_labels[:NUM_TEST])
model = seeded_model(preset, dataset, seed=3)
predictions, class_accuracy = evaluate(model, dataset, shard, device, batch_size=16)
inputs = normalize(dataset.train_images[:NUM_SCORED], torch.tensor(dataset.mean), torch.tensor(dataset.std))
labels = dataset.train_labels[:NUM_SCORED]
scores = {name: sharded_scores(fn, model, inputs, labels, shard, batch_size=8) for name, fn in SCORE_FUNCTIONS.items()}
indices = gather(part(NUM_TEST, shard).numpy(), shard)
if shard.rank == 0:
    np.savez(sys.argv[1], predictions=predictions, class_accuracy=class_accuracy, indices=indices,
             world_size=shard.world_size, **scores)
torch.distributed.destroy_process_group()
