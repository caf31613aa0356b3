"""Latents once: a pre-pass encodes every image a run uses, so that no training step runs the VAE encoder.

With the fixed centre crop (no augmentation) an image's latent distribution — the VAE's mean and
log-variance — is the same at every step. The pre-pass decodes each image file once (in the data loader's
worker processes), encodes in batches under the run's precision and keeps mean and log-variance in fp32 on
the training device; a step then draws z = mean + exp(logvar / 2)·ε with the run's own generator, exactly
as encoding at every step does. With a frozen text encoder its outputs are kept too: one per distinct
prompt, and the empty prompt of prompt dropout.

The images encoded are those of the whole run's plan (every step from the first, whatever step a resumed
run starts at), in a fixed order and batching, so that a resumed run uses bit-identical latents. With several
processes each encodes its share of them and the shares are gathered: every process holds them all.
Memory: 2 × 4 × (R/8)² fp32 values per image, 50 KB at 224 px and 256 KB at 512 px (3,000 images:
150 MB / 770 MB).
"""
import hashlib
import json
import os
import warnings

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .checkpoint.files import all_finite, atomic_save, first_line
from .graphs import to_device
from .stopping import ignore_stop_signals


def as_list(items):
    return items


def vae_fingerprint(vae):
    """sha256 over the VAE's parameter names, shapes and 64 values of each: a cached latent is reused only
    with the same VAE weights (in the same dtype)."""
    h = hashlib.sha256()
    for name, value in vae.state_dict().items():
        flat = value.detach().flatten()
        picks = torch.linspace(0, flat.numel() - 1, 64, device=flat.device).long()
        h.update(f"{name}:{list(value.shape)}:{value.dtype}:".encode())
        h.update(flat[picks].float().cpu().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """mean and logvar [n, 4, h, w] (fp32, on the device) of the images at dataset `indices`."""

    def __init__(self, indices, mean, logvar, size):
        self.indices, self.mean, self.logvar = list(indices), mean, logvar
        self.row = torch.full((size,), -1, dtype=torch.long)
        self.row[torch.tensor(self.indices, dtype=torch.long)] = torch.arange(len(self.indices))

    def rows(self, indices):
        """Rows of the cache holding dataset `indices` (a CPU LongTensor)."""
        rows = self.row[torch.as_tensor(indices, dtype=torch.long)]
        if (rows < 0).any():
            raise KeyError(f"image {indices[int((rows < 0).nonzero()[0])]} was not encoded by the pre-pass")
        return rows

    def gather(self, rows):
        return self.mean.index_select(0, rows), self.logvar.index_select(0, rows)


@torch.no_grad()
def encode_images(sd, dataset, indices, batch_size, autocast, workers=0, show=True, desc="encoding latents"):
    """(mean, logvar) fp32 on sd's device for dataset[i], i in `indices`, each image read and decoded once."""
    device = sd.device
    n = len(indices)
    shape = (n, sd.config.vae.z_channels, dataset.resolution // 8, dataset.resolution // 8)
    mean, logvar = torch.empty(shape, device=device), torch.empty(shape, device=device)
    chunks = [indices[s:s + batch_size] for s in range(0, n, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, collate_fn=as_list, num_workers=workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    done = 0
    with tqdm(total=n, desc=desc, unit="img", disable=not show, dynamic_ncols=True, leave=False) as bar:
        for items in loader:
            images = to_device(torch.stack([item["image"] for item in items]), device)
            with autocast():
                m, lv = sd.vae.encode(images)
            mean[done:done + len(items)] = m.float()
            logvar[done:done + len(items)] = lv.float()
            done += len(items)
            bar.update(len(items))
    return mean, logvar


def cache_key(sd, dataset, precision, manifest):
    """What the latents depend on: the VAE's weights, the images (the manifest) and their size, the precision."""
    manifest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return json.dumps({"vae": vae_fingerprint(sd.vae), "data": dataset.name, "split": dataset.split,
                       "manifest": manifest, "resolution": dataset.resolution, "precision": precision}, sort_keys=True)


def read_cache_file(path, key, ids, device, shape):
    """(mean, logvar) for sample `ids` from a cache file written with `key` (each latent of `shape`), or None
    when there is none that fits; a damaged file is warned about, and encoded again."""
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            stored = json.loads(meta.get("ids", "[]"))
            if not (isinstance(stored, list) and all(isinstance(i, str) for i in stored)):
                raise ValueError("its ids are not a list of sample ids")
            where = {sample_id: row for row, sample_id in enumerate(stored)}
            if not all(i in where for i in ids):
                return None
            rows = torch.tensor([where[i] for i in ids], dtype=torch.long)
            found = []
            for name in ("mean", "logvar"):
                tensor = f.get_tensor(name)
                if tensor.dtype != torch.float32 or tensor.shape[:1] != (len(stored),) or tensor.shape[1:] != shape:
                    raise ValueError(f"{name} is {tensor.dtype} {list(tensor.shape)}, expected float32 "
                                     f"{[len(stored), *shape]}")
                if not all_finite(tensor):
                    raise ValueError(f"{name} holds NaN or infinite values")
                found.append(tensor[rows].to(device))
            return tuple(found)
    except (OSError, ValueError, RuntimeError, RecursionError, SafetensorError) as e:   # torn or foreign file
        warnings.warn(f"{path}: damaged ({first_line(e)}); encoding the latents again")
        return None


def build_latent_cache(sd, dataset, indices, batch_size, autocast, precision, workers=0, rank=0, world=1,
                       path=None, show=True):
    """The LatentCache of `indices` (sorted, distinct) of `dataset`. With `path`, reused from that file
    when it was written for the same VAE, images and precision, else encoded and written there (by rank 0).
    With world > 1 every process encodes one share and all receive all (collective: every rank calls)."""
    indices, found = sorted(set(indices)), None
    if path:
        manifest = dataset.manifest()
        ids, key = [manifest[i]["id"] for i in indices], cache_key(sd, dataset, precision, manifest)
        shape = (sd.config.vae.z_channels, dataset.resolution // 8, dataset.resolution // 8)
        found = read_cache_file(path, key, ids, sd.device, shape)
    if world > 1:   # every process must take the same branch of the collective below
        flag = torch.tensor([0 if found is None else 1], device=sd.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        found = found if flag.item() else None
    if found is None:
        share = -(-len(indices) // world)
        mine = indices[rank * share:(rank + 1) * share]
        mean, logvar = encode_images(sd, dataset, mine, batch_size, autocast, workers, show)
        if world > 1:
            mean, logvar = (gather_shares(t, share, len(indices)) for t in (mean, logvar))
        if path and rank == 0:
            atomic_save({"mean": mean.cpu(), "logvar": logvar.cpu()}, path, {"key": key, "ids": json.dumps(ids)})
        found = mean, logvar
    return LatentCache(indices, *found, size=len(dataset))


def gather_shares(share_tensor, share, total):
    """Every process's share (padded to `share` rows), concatenated in rank order, cut to `total` rows."""
    padded = share_tensor.new_zeros(share, *share_tensor.shape[1:])
    padded[:len(share_tensor)] = share_tensor
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:total]


class PromptCache:
    """The frozen text encoder's output for each distinct prompt (row 0: the empty prompt), stored in the
    autocast dtype when there is one: the U-Net's attention casts it to that dtype before any use."""

    def __init__(self, sd, prompts, autocast, dtype=None, batch_size=32):
        distinct = [""] + sorted(set(prompts) - {""})
        self.row = {prompt: i for i, prompt in enumerate(distinct)}
        parts, truncated = [], 0
        with torch.no_grad():
            for start in range(0, len(distinct), batch_size):
                ids, count = sd.tokenizer.tokenize(distinct[start:start + batch_size])
                ids, truncated = ids.to(sd.device), truncated + count
                with autocast():
                    context = sd.text_encoder(ids)
                parts.append(context.to(dtype or context.dtype))
        self.table = torch.cat(parts)
        if truncated:
            length = sd.tokenizer.length
            warnings.warn(f"{truncated} of {len(distinct)} distinct prompts are longer than {length} tokens and are "
                          f"truncated to {length}, as the text encoder reads them")

    def rows(self, prompts):
        return torch.tensor([self.row[p] for p in prompts], dtype=torch.long)

    def gather(self, rows):
        return self.table.index_select(0, rows)
