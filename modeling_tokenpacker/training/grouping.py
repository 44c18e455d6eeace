"""Batches of similar length, and of one modality, in the order the original's `group_by_modality_length` gives.

The original estimates a sample's length cheaply, without tokenizing or opening an image: the words of every turn,
plus 128 for a sample with an image (`group_by_length`); with `group_by_modality_length` image samples count
positive and text-only samples negative, so that no mega-batch mixes the two. Every random draw is `torch.randperm`
on `generator` (the global generator when None, as in the original, whose sampler passes none: every process of a
distributed run, seeded alike by Trainer, then draws the same order).
"""

import torch
from torch.utils.data import Sampler

IMAGE_LENGTH_ESTIMATE = 128


def estimated_length(turns, has_image):
    """The original's cheap length: whitespace-separated words of every turn (+128 with an image)."""
    return sum(len(text.split()) for _, text in turns) + (IMAGE_LENGTH_ESTIMATE if has_image else 0)


def modality_length(turns, has_image):
    """Words of every turn, positive for an image sample, negative for a text-only one (never 0: an empty sample
    counts one word so that its modality survives)."""
    words = max(sum(len(text.split()) for _, text in turns), 1)
    return words if has_image else -words


def balanced_chunks(indices, lengths, num_chunks):
    """Deal `indices` (longest first) into `num_chunks` equal-sized chunks, each to the chunk with the least length
    so far; when they do not divide evenly, every `num_chunks`-th index instead. `lengths` is indexed by index."""
    if len(indices) % num_chunks:
        return [indices[start::num_chunks] for start in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        target = totals.index(min(totals))
        chunks[target].append(index)
        totals[target] += lengths[index]
        if len(chunks[target]) == per_chunk:
            totals[target] = float("inf")
    return chunks


def length_grouped_indices(lengths, batch_size, world_size, generator=None):
    """A random permutation cut into mega-batches of `world_size * batch_size`, each sorted longest first (stable)
    and dealt into `world_size` balanced chunks: -> a flat list of indices into `lengths`."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    grouped = []
    for start in range(0, len(order), size):
        megabatch = sorted(order[start:start + size], key=lambda index: lengths[index], reverse=True)
        for chunk in balanced_chunks(megabatch, lengths, world_size):
            grouped.extend(chunk)
    return grouped


def modality_length_grouped_indices(lengths, batch_size, world_size, generator=None):
    """Image samples (`lengths > 0`) and text-only ones (`< 0`) length-grouped apart, image ones drawn first; their
    mega-batches shuffled together except the last of each, which are joined (sorted by index) at the end. With
    one modality only (where the original fails an assertion) this is `length_grouped_indices`."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero: positive for image samples, negative for text-only ones.")
    image = [(index, length) for index, length in enumerate(lengths) if length > 0]
    text = [(index, -length) for index, length in enumerate(lengths) if length < 0]
    if not image or not text:
        return length_grouped_indices([abs(length) for length in lengths], batch_size, world_size, generator)
    size = world_size * batch_size
    megabatches = []
    for group in (image, text):
        indices, group_lengths = zip(*group)
        shuffled = [indices[i] for i in length_grouped_indices(group_lengths, batch_size, world_size, generator)]
        megabatches.append([shuffled[start:start + size] for start in range(0, len(shuffled), size)])
    (*image_full, image_last), (*text_full, text_last) = megabatches
    full = image_full + text_full
    order = torch.randperm(len(full), generator=generator).tolist()
    return [index for position in order for index in full[position]] + sorted(image_last + text_last)


class ModalityLengthGroupedSampler(Sampler):
    """Sampler over a dataset's estimated lengths: `modality_length_grouped_indices` (`group_by_modality=True`,
    signed lengths) or `length_grouped_indices`, drawn anew at each iteration."""

    def __init__(self, lengths, batch_size, world_size, group_by_modality=True, generator=None):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.group_by_modality = group_by_modality
        self.generator = generator

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        group = modality_length_grouped_indices if self.group_by_modality else length_grouped_indices
        return iter(group(self.lengths, self.batch_size, self.world_size, self.generator))
