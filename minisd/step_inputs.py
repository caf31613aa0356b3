"""What a training step reads (part of minisd.training's Trainer): the run's plan of images and its batches,
the random draws, the pre-pass's caches (minisd.latents), a micro-batch's host tensors and their form on the
device."""
import warnings

import torch

from .latents import PromptCache, as_list, build_latent_cache
from .stopping import ignore_stop_signals


DATA = ("rows", "images", "context_rows", "ids")   # what host_inputs makes; the rest of a step's inputs are draws


class StepInputs:
    """Trainer methods; they use its args, sd, data sets, rank/world, run folder and autocast."""

    def epoch_order(self, epoch):
        """The permutation of the training set that epoch `epoch` (from 0) walks, seeded by (seed, epoch). Steps
        ask in order, so the last one drawn is kept: one permutation per epoch, not per micro-batch."""
        if self.last_order[0] != epoch:
            seed = self.args.seed * 100003 + epoch
            self.last_order = epoch, torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed))
        return self.last_order[1]

    def batch_indices(self, step, micro):
        """Dataset indices of this process's share of micro-batch `micro` of optimizer step `step` (1-based):
        each epoch walks a permutation seeded by (seed, epoch), dropping the incomplete tail."""
        epoch, within = divmod(step - 1, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = (within * self.args.grad_accum + micro) * self.global_batch + self.rank * self.args.batch_size
        return order[start:start + self.args.batch_size].tolist()

    def draws(self, shape):
        """Randomness of one global micro-batch, sliced to this process (on the CPU)."""
        g, n = self.generator, self.global_batch
        d = {"latent": torch.randn(n, *shape, generator=g), "t": torch.randint(0, 1000, (n,), generator=g),
             "noise": torch.randn(n, *shape, generator=g), "drop": torch.rand(n, generator=g) < self.args.cfg_dropout}
        lo = self.rank * self.args.batch_size
        return {k: v[lo:lo + self.args.batch_size] for k, v in d.items()}

    def batches(self):
        """This process's micro-batches from the next step to the end: dataset indices when the latents are
        cached, else the items, loaded ahead by `--workers` processes (the order is fixed by batch_indices,
        so prefetching changes nothing)."""
        plan = [self.batch_indices(step, micro) for step in range(self.step + 1, self.total_steps + 1)
                for micro in range(self.args.grad_accum)]
        if self.train_latents is not None:
            return iter(plan)
        return iter(torch.utils.data.DataLoader(self.train_set, batch_sampler=plan, collate_fn=as_list,
                                                num_workers=self.args.workers, pin_memory=self.device.startswith("cuda"),
                                                worker_init_fn=ignore_stop_signals))

    def plan(self):
        """Dataset indices of every image the run's steps use, from its first step, all processes."""
        used = set()
        for epoch in range(-(-self.total_steps // self.steps_per_epoch)):
            steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
            used.update(self.epoch_order(epoch)[:steps * self.args.grad_accum * self.global_batch].tolist())
        return sorted(used)

    def val_count(self):
        """Images of the validation split in the validation loss (the first --val-max)."""
        if self.val_set is None:
            return 0
        return min(len(self.val_set), self.args.val_max or len(self.val_set))

    def cache_inputs(self):
        """The pre-pass (minisd.latents): latents of every image the run uses, and with a frozen text
        encoder its output for every prompt."""
        a = self.args
        if not a.cache_latents or any(p.requires_grad for p in self.sd.vae.parameters()):   # a VAE that trains
            return
        common = dict(batch_size=a.batch_size, autocast=self.autocast_ctx, precision=a.precision, workers=a.workers,
                      show=self.run.writer)
        disk = lambda split: self.run.file(f"latents_{split}.safetensors") if a.cache_latents_to_disk else None  # noqa: E731
        plan = self.plan()
        self.train_latents = build_latent_cache(self.sd, self.train_set, plan, rank=self.rank, world=self.world,
                                                path=disk("train"), **common)
        self.train_prompts = {i: self.train_set.prompt(i) for i in plan}
        prompts = list(self.train_prompts.values())
        if self.run.writer and self.val_count():
            self.val_latents = build_latent_cache(self.sd, self.val_set, range(self.val_count()), path=disk("val"), **common)
            prompts += [self.val_set.prompt(i) for i in range(self.val_count())]
        if not any(p.requires_grad for p in self.sd.text_encoder.parameters()):
            self.prompt_cache = PromptCache(self.sd, prompts, self.autocast_ctx, self.autocast)

    READS_TEXT = True   # a trainer whose loss reads no prompt (the VAE stage) gets neither token ids nor context

    def host_inputs(self, data, drop, latents, prompt):
        """One micro-batch's data as host tensors: rows of the latent cache (else the images) and rows of
        the prompt cache (else token ids); `drop` (or None) marks the samples trained on the empty prompt."""
        if latents is not None:
            inputs = {"rows": latents.rows(data)}
            prompts = [prompt(i) for i in data]
        else:
            inputs = {"images": torch.stack([item["image"] for item in data])}
            prompts = [item["prompt"] for item in data]
        if not self.READS_TEXT:
            return inputs
        if drop is not None:
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        if self.prompt_cache is not None:
            inputs["context_rows"] = self.prompt_cache.rows(prompts)
        else:
            inputs["ids"] = self.token_ids(prompts)
        return inputs

    def token_ids(self, prompts):
        """[B, 77] token ids, each distinct prompt tokenised once per run (the BPE is Python, on the host)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.tokens]
        if missing:
            ids, truncated = self.sd.tokenizer.tokenize(missing)
            self.tokens.update(zip(missing, ids))
            if truncated and not self.warned_truncation:   # once per run, not at every step that meets a long report
                self.warned_truncation = True
                length = self.sd.tokenizer.length
                warnings.warn(f"prompts longer than {length} tokens are truncated to {length}, as the text encoder "
                              f"reads them (said once per run)")
        return torch.stack([self.tokens[p] for p in prompts])

    def device_batch(self, x, latents):
        """(batch, draws) of a micro-batch from its device inputs `x` (host_inputs' and the draws), the caches'
        rows gathered."""
        batch, draws = {}, {k: v for k, v in x.items() if k not in DATA}
        if "rows" in x:
            batch["mean"], batch["logvar"] = latents.gather(x["rows"])
        else:
            batch["images"] = x["images"]
        if "context_rows" in x:
            batch["context"] = self.prompt_cache.gather(x["context_rows"])
        elif "ids" in x:
            batch["ids"] = x["ids"]
        return batch, draws
