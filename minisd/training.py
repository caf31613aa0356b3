"""The fine-tuning loop: ε-prediction MSE on VAE latents, adapters in the U-Net and text encoder.

Every random draw of a step (latent sample, timesteps, noise, prompt dropout, DyLoRA rank) comes from
one CPU generator for the whole global batch, which each process slices: runs are reproducible, a
resumed run continues exactly, and N processes compute what one process would with the same global
batch. Adapter gradients are averaged across processes by hand, because SeLoRA changes parameter
shapes during training, which DistributedDataParallel cannot follow.
"""
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import adapters, graphs
from .checkpoint.files import first_line
from .cli import split_fractions
from .data import load_dataset, summary
from .errors import MinisdError
from .layout import prepare_for_training
from .measures import Measures
from .model import load
from .optim import Adam
from .plots import loss_curve, rank_heatmap
from .progress import TrainingBar
from .resume_state import read_training_checkpoint
from .runs import PLACE_ARGS, Run, atomic_torch_save, check_recorded_args
from .sampling import add_noise, alphas_cumprod, ddim_sample
from .step_inputs import StepInputs
from .stopping import Interrupted, StopRequests

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_distributed(device_name):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device_name
    backend = "nccl" if device_name.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if device_name.startswith("cuda"):
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device_name)
    return rank, world, device_name


def average_gradients(params, world, extra=()):
    """Average the parameters' gradients (and the `extra` tensors, in the same all-reduce) over processes."""
    grads = [p.grad for p in params if p.grad is not None] + list(extra)
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def validation_due(step, steps_per_epoch, every, total):
    """Validate at an epoch's end, at most every `every` steps (the first epoch end past each multiple of
    `every`), and at the last step: a pure function of the step, so a resumed run validates where the
    uninterrupted one would."""
    if step == total:
        return True
    return step % steps_per_epoch == 0 and step // every > (step - steps_per_epoch) // every


def trainable_state(sd):
    return {name: p.detach().cpu().clone() for name, p in sd.named_parameters() if p.requires_grad}


class Trainer(StepInputs):
    LOSS = "ε-prediction MSE"   # what the loss curve shows

    def __init__(self, args, run_path, resume):
        self.args = args
        self.rank, self.world, self.device = setup_distributed(args.device)
        self.run = Run(run_path, writer=self.rank == 0, resume=resume, tensorboard=args.tensorboard)
        self.autocast = AUTOCAST[args.precision]
        if args.precision == "fp16" and not self.device.startswith("cuda"):
            raise MinisdError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")

        self.resume = resume
        self.setup_model()
        prepare_for_training(self.sd, self.autocast, self.device)

        # The split is the data's (--data-seed, --split), never the run's --seed: runs with other seeds share a test set.
        self.train_set = self.load_split("train")
        self.val_set = self.load_split("val") if "val" in self.train_set.splits else None
        self.global_batch = args.batch_size * self.world
        self.steps_per_epoch = len(self.train_set) // (self.global_batch * args.grad_accum)
        if self.steps_per_epoch == 0:
            raise MinisdError(f"the training split has {len(self.train_set)} images, fewer than one step's "
                              f"{self.global_batch * args.grad_accum} (--batch-size × processes × --grad-accum)")
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch

        self.params = [p for p in self.sd.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
        self.setup_optimizer()
        # A captured step (minisd.graphs) replays fixed kernels: no loss scaling (it skips steps by reading
        # the gradients on the host), no collectives, no per-step Python decisions (DyLoRA, AdaLoRA, a
        # learning-rate schedule).
        capture = (graphs.BACKEND.available(self.device) and self.world == 1 and args.precision != "fp16"
                   and args.method in ("lora", "selora"))
        self.inputs = graphs.StaticInputs(self.device)
        self.replayer = graphs.Replayer(self.compute, self.device, name="training step") if capture else None
        self.generator = torch.Generator().manual_seed(args.seed)
        self.ac = alphas_cumprod(self.sd.schedule).to(self.device)
        self.step, self.best_val, self.rank_history, self.val_fields = 0, math.inf, [], {}
        self.measures = Measures(self.device)
        self.stop = StopRequests()
        self.train_latents = self.val_latents = self.prompt_cache = None
        self.train_prompts, self.tokens, self.warned_truncation, self.last_order = {}, {}, False, (None, None)
        self.pending, self.bar, self.shown, self.launched_at = [], None, {}, time.perf_counter()
        if resume:
            self.load_checkpoint()
        self.run.open_log(keep_until_step=self.step if resume else None)

    # ------------------------------------------------------------------------- what is trained

    def setup_model(self):
        """The base model with adapters injected (seeded: the same on every process and every resume)."""
        args = self.args
        self.sd = load(args.model, device=self.device, dtype=torch.float32)
        self.sd.set_gradient_checkpointing(args.grad_checkpointing)
        torch.manual_seed(args.seed)
        self.summary = adapters.inject(self.sd, args.method, rank=args.rank, alpha=args.alpha, convs=args.convs,
                                       text_encoder=not args.freeze_text_encoder)
        self.layers = adapters.adapted_layers(self.sd)
        self.fingerprint = adapters.fingerprint(self.sd)   # of the base weights: a resumed run must have the same

    def setup_optimizer(self):
        """Adam with a step count per entry (grown ranks start fresh), and the method's rank controller."""
        args = self.args
        if args.method == "selora" and self.total_steps < args.expand_every and self.rank == 0:
            warnings.warn(f"SeLoRA tests ranks every {args.expand_every} steps (--expand-every) and this run has "
                          f"{self.total_steps} (--max-steps / --epochs): no layer will grow")
        self.optimizer = Adam(self.params, lr=args.lr)
        self.controller = None
        if args.method == "selora":
            self.controller = adapters.SeLoRAController(self.layers.items(), lam=args.lam, every=args.expand_every,
                                                        max_rank=args.max_rank, fisher_window=args.fisher_window,
                                                        seed=args.seed, distributed=self.world > 1, fisher=args.fisher)
        elif args.method == "adalora":
            self.controller = adapters.AdaLoRAController(self.layers.items(), total_steps=self.total_steps, target_rank=args.rank)

    def load_split(self, split):
        a = self.args
        with warnings.catch_warnings():
            if split != "train":   # each load checks the whole folder: its warnings were given with the training split
                warnings.simplefilter("ignore", UserWarning)
            return load_dataset(a.data, a.data_root, split, a.resolution, a.data_seed, window=a.window,
                                fractions=split_fractions("--split", a.split))

    def description(self):
        """What trains, for the start of the run's output."""
        return (f"adapters: {self.summary['method']} in {self.summary['layers']} layers, "
                f"{self.summary['trainable_params']:,} trainable parameters")

    def step_fields(self):
        """What the log records of each step besides its loss, learning rate and speed."""
        return {"total_rank": self.total_rank()}

    def shown_fields(self):
        """What the progress bar shows besides the loss and speed."""
        return {"rank": self.total_rank()}

    # ------------------------------------------------------------------------------------ a step

    def autocast_ctx(self):
        # no weight cache: a captured step must cast inside its graph (and the frozen weights are cast already)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None, cache_enabled=False)

    def loss(self, batch, draws, with_grad=True):
        if "images" in batch:
            with torch.no_grad(), self.autocast_ctx():
                mean, logvar = self.sd.vae.encode(batch["images"])
            mean, logvar = mean.float(), logvar.float()
        else:
            mean, logvar = batch["mean"], batch["logvar"]
        latents = (mean + (0.5 * logvar).exp() * draws["latent"]) * self.sd.vae.scaling_factor
        noisy = add_noise(latents, draws["noise"], draws["t"], self.ac)
        with torch.set_grad_enabled(with_grad), self.autocast_ctx():
            context = batch["context"] if "context" in batch else self.sd.text_encoder(batch["ids"])
            eps = self.sd.unet(noisy, draws["t"], context)
        return F.mse_loss(eps.float(), draws["noise"])

    def compute(self):
        """Forward, backward and optimizer step on the micro-batches in self.inputs -> the step's mean loss
        (a device tensor). Host work free, so that on a GPU it is captured and replayed (minisd.graphs)."""
        self.optimizer.zero_grad(set_to_none=True)
        k, total = self.args.grad_accum, None
        for micro in range(k):
            batch, draws = self.device_batch({name: value[micro] for name, value in self.inputs.items()},
                                             self.train_latents)
            loss = self.loss(batch, draws)
            if self.args.method == "adalora":
                loss = loss + self.controller.regularizer()
            self.scaler.scale(loss / k).backward()
            total = loss.detach() / k if total is None else total + loss.detach() / k
        candidates = self.controller.batch_gradients() if self.args.method == "selora" else []
        average_gradients(self.params, self.world, candidates)
        if candidates:   # the batch estimator squares the complete gradients, still loss-scaled
            self.controller.end_backward(self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        if self.world > 1:
            dist.all_reduce(total)
            total = total / self.world
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def graph_key(self, tracking):
        """What a captured step bakes in: every tensor it reads or updates in place, and Python settings."""
        state = [v for p in self.params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        tensors = [*self.params, *state, *self.inputs.values()]
        if self.args.method == "selora":
            tensors += [getattr(layer, name) for layer in self.layers.values()
                        for name in ("candidate", "fisher_A", "fisher_B", "fisher_new")]
        return tracking, self.optimizer.param_groups[0]["lr"], graphs.tensor_key(tensors)

    def train_step(self, batches):
        """Launch one optimizer step -> (its loss as a device tensor, SeLoRA growth events)."""
        step = self.step + 1
        tracking = False
        if self.args.method == "selora":
            self.controller.begin_step(step)
            tracking = self.controller.tracking(step)
        if self.args.method == "dylora":
            adapters.sample_dylora_rank(self.layers.values(), self.generator)
        latent_shape = (self.sd.config.vae.z_channels, self.args.resolution // 8, self.args.resolution // 8)
        micro = []
        for _ in range(self.args.grad_accum):
            data, draws = next(batches), self.draws(latent_shape)
            drop = draws.pop("drop", None)
            micro.append({**self.host_inputs(data, drop, self.train_latents, self.train_prompts.get), **draws})
        self.inputs.fill({name: torch.stack([m[name] for m in micro]) for name in micro[0]})
        if self.replayer is not None:
            loss = self.replayer(self.graph_key(tracking)).clone()   # the graph's output is overwritten by the next replay
        else:
            loss = self.compute()
        events = []
        if self.args.method == "selora":
            events = self.controller.end_step(step, self.optimizer)
        elif self.args.method == "adalora":
            self.controller.update_and_allocate(step)
        self.step = step
        return loss, events

    def settle(self, keep=0):
        """Log the launched steps but the newest `keep`. Reading a step's loss waits for that step, so the
        loop reads each one only after the next is queued; a non-finite loss stops the run here, before
        any checkpoint could hold its update."""
        while len(self.pending) > keep:
            step, loss, record, shown, events, seconds = self.pending.pop(0)
            loss, rate = loss.item(), self.global_batch * self.args.grad_accum / max(seconds, 1e-9)
            if not math.isfinite(loss):
                last = self.run.file("checkpoint.pt")
                raise MinisdError(f"non-finite loss at step {step}; stopped with the last good checkpoint "
                                  f"{last if os.path.exists(last) else '(none yet)'} intact — try --precision bf16/fp32 or a lower --lr")
            self.run.log({"step": step, "loss": loss, "images_per_s": rate, **record})
            for e in events:
                self.run.log({"event": "expand", **e})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", **shown, img_s=f"{rate:.1f}", **self.shown)
                self.bar.step_done(seconds)
                if events and self.run.writer:
                    self.bar.write(f"step {step}: {len(events)} layers grew; total rank {record['total_rank']}")

    # ------------------------------------------------------------------------------ validation

    def total_rank(self):
        return sum(layer.rank for layer in self.layers.values())

    def ranks(self):
        return {name: layer.rank for name, layer in self.layers.items()}

    @torch.no_grad()
    def validate(self):
        """Mean loss over the validation split with fixed draws (the same every time), and a sample grid."""
        if self.args.method == "dylora":
            adapters.set_dylora_rank(self.layers.values(), None)
        if self.replayer is not None:
            self.replayer.release()   # the captured step's memory, while sampling needs some
        val_loss, n = None, self.val_count()
        if n:
            g = torch.Generator().manual_seed(self.args.seed + 1)
            shape = (self.sd.config.vae.z_channels, self.args.resolution // 8, self.args.resolution // 8)
            losses = []
            for start in range(0, n, self.args.batch_size):
                indices = list(range(start, min(n, start + self.args.batch_size)))
                b = len(indices)
                draws = {"latent": torch.randn(b, *shape, generator=g), "t": torch.randint(0, 1000, (b,), generator=g),
                         "noise": torch.randn(b, *shape, generator=g)}
                data = indices if self.val_latents is not None else [self.val_set[i] for i in indices]
                x = {**self.host_inputs(data, torch.zeros(b, dtype=torch.bool), self.val_latents, self.val_set.prompt), **draws}
                batch, draws = self.device_batch({k: graphs.to_device(v, self.device) for k, v in x.items()},
                                                 self.val_latents)
                losses.append(self.loss(batch, draws, with_grad=False).item() * b)
            val_loss = sum(losses) / n
            if not math.isfinite(val_loss):   # logged as null; a NaN is never the best, so the best adapter stays
                warnings.warn(f"validation loss at step {self.step} is {val_loss} (overflow in half precision? "
                              f"try --precision bf16 or fp32); the best adapter so far is kept")
        source = self.val_set if self.val_set is not None and len(self.val_set) else self.train_set
        prompts = [source.prompt(i) for i in range(min(self.args.val_images, len(source)))]
        if prompts:
            with self.autocast_ctx():
                images = ddim_sample(self.sd, prompts, steps=self.args.val_steps, height=self.args.resolution,
                                     width=self.args.resolution, seed=self.args.seed, progress=False)
            self.run.save_samples(images, prompts, self.step)
        return val_loss

    # ---------------------------------------------------------------------------- files

    def save_adapter(self, name, val_loss):
        """The adapter file, with the step and the validation loss it was saved at in its metadata."""
        adapters.save_adapter(self.run.file(name), self.sd, self.args.method, self.args.alpha, args=vars(self.args),
                              rank_history=self.rank_history, step=self.step, val_loss=val_loss)

    def record(self, val_loss, adapter=None, kind=""):
        """The model as it is now for summary.json, with heat-maps of its ranks (ranks_{kind}PART.png)."""
        ranks, heatmaps = self.ranks(), {}
        for part, title in (("unet", "U-Net"), ("text_encoder", "text encoder")):
            if rank_heatmap(ranks, part, self.run.file(f"ranks_{kind}{part}.png"), f"{title} (step {self.step})"):
                heatmaps[part] = f"ranks_{kind}{part}.png"
        return Measures.adapter_record(self.sd, ranks, self.step, val_loss, adapter, heatmaps)

    def write_summary(self, last, finished=False):
        """summary.json: what the paper's tables report, as of now (see minisd.measures)."""
        self.run.save_json("summary.json", self.measures.summary(self.step, self.total_steps, last, finished))

    def write_manifests(self):
        """The manifests of every split of the data, the test split's included, whatever this run reads."""
        for split in self.train_set.splits:
            ds = {"train": self.train_set, "val": self.val_set}.get(split)
            if ds is None:
                try:
                    ds = self.load_split(split)
                except MinisdError as e:   # an empty test split does not stop training
                    warnings.warn(f"no manifest of split {split!r}: {e}")
                    continue
            ds.write_manifest(self.run.file(f"manifest_{split}.jsonl"))

    def save_checkpoint(self):
        self.settle()   # never a checkpoint past a step whose loss was not checked
        if not self.run.writer:
            return
        state = {"method": self.args.method, "fingerprint": self.fingerprint, "step": self.step,
                 "trainable": trainable_state(self.sd), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "best_val": self.best_val, "rank_history": self.rank_history,
                 "controller": self.controller.state_dict() if self.controller is not None else None,
                 "measures": self.measures.state_dict(), **self.extra_state(),
                 "args": {k: v for k, v in vars(self.args).items() if k not in PLACE_ARGS}}
        atomic_torch_save(state, self.run.file("checkpoint.pt"))

    def load_checkpoint(self):
        """Restore the state of a stopped run, after checking that it is this run's: same method, same
        base model, the same adapted parameters (at the checkpoint's ranks)."""
        path = self.run.file("checkpoint.pt")
        state = read_training_checkpoint(path)
        saved = state["controller"]
        kind = None if saved is None else "selora" if "layers" in saved else "adalora"
        wanted = self.args.method if self.controller is not None else None   # the methods with a controller state
        recorded = state.get("method")   # absent from older checkpoints
        if recorded not in (None, self.args.method) or recorded is None and kind != wanted:
            raise MinisdError(f"--resume: {path} holds the state of a {state.get('method') or 'different'} run, "
                              f"not of a {self.args.method} run")
        if kind != wanted:
            raise MinisdError(f"--resume: {path}: 'controller' is damaged, expected the state of a {self.args.method} "
                              f"run (the file is damaged or not from train.py)")
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise MinisdError(f"--resume: {path} was written for another base model than {self.args.model}")
        if isinstance(state.get("args"), dict):
            check_recorded_args(state["args"], self.args, self.run.file("args.json"), path)
        trainable = {name for name, p in self.sd.named_parameters() if p.requires_grad}
        unmatched = sorted(trainable ^ set(state["trainable"]))
        if unmatched:
            where = "the checkpoint" if unmatched[0] in trainable else "this model"
            raise MinisdError(f"--resume: {path}: adapter parameter {unmatched[0]} is missing from {where}")
        if state["controller"] is not None:
            try:   # SeLoRA: resizes layers to their saved ranks
                self.controller.load_state_dict(state["controller"])
            except MinisdError as e:
                raise MinisdError(f"--resume: {path}: {e}") from None
            except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
                raise MinisdError(f"--resume: {path}: its {self.args.method} state does not fit this run "
                                  f"({first_line(e)})") from None
        params = dict(self.sd.named_parameters())
        for name, value in state["trainable"].items():
            if value.shape != params[name].shape:
                raise MinisdError(f"--resume: {path}: {name} has shape {list(value.shape)}, "
                                  f"this model's is {list(params[name].shape)}")
            if value.dtype != params[name].dtype:   # train.py keeps adapters in fp32 whatever --precision
                raise MinisdError(f"--resume: {path}: {name} is {value.dtype}, this model's is {params[name].dtype}")
            params[name].data = value.to(self.device)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
            raise MinisdError(f"--resume: {path}: optimizer or random state does not fit this run ({e})") from None
        self.step, self.best_val, self.rank_history = state["step"], state["best_val"], state["rank_history"]
        self.measures = Measures(self.device, state.get("measures"))   # absent from older checkpoints
        self.load_extra_state(state, path)

    def extra_state(self):
        """What a checkpoint holds beyond the state every run has."""
        return {}

    def load_extra_state(self, state, path):
        pass

    # ------------------------------------------------------------------------------------ loop

    def end_of_validation_period(self):
        val_loss = self.validate() if self.run.writer else None
        if self.run.writer:
            self.run.log({"step": self.step, "event": "validation", "val_loss": val_loss, **self.val_fields})
            if val_loss is None or val_loss < self.best_val:
                self.best_val = val_loss if val_loss is not None else self.best_val
                self.save_best(val_loss)
            self.write_summary(self.record(val_loss))
            self.run.log_ranks(self.ranks(), self.step)
            loss_curve(self.run.records, self.run.file("loss.png"), self.LOSS)
        return val_loss

    def save_best(self, val_loss):
        self.save_adapter("adapter.safetensors", val_loss)
        self.measures.best = self.record(val_loss, "adapter.safetensors", "best_")

    def finish(self, val_loss):
        """The files of a finished run: the last adapter, the best one if no validation chose it, the summary."""
        self.save_adapter("adapter_last.safetensors", val_loss)
        if not os.path.exists(self.run.file("adapter.safetensors")):
            self.save_best(val_loss)
        self.write_summary(self.record(val_loss, "adapter_last.safetensors"), finished=True)
        print(f"done: {self.run.path} (total rank {self.total_rank()}, best validation loss "
              f"{self.best_val if self.best_val < math.inf else 'n/a'})")

    def validation_due(self, step):
        return validation_due(step, self.steps_per_epoch, self.args.val_every, self.total_steps)

    def validations_after(self, step):
        return sum(self.validation_due(s) for s in range(step + 1, self.total_steps + 1))

    def fit(self):
        """Steps to the end, validating and checkpointing on schedule. Inside `with trainer.stop:` (train.py),
        SIGINT/SIGTERM end it after the step in progress with a checkpoint and Interrupted."""
        a = self.args
        if self.run.writer:
            print(summary(self.train_set))
            print(f"{self.description()}; {self.total_steps} steps of {self.global_batch * a.grad_accum} images")
            self.write_manifests()
        self.cache_inputs()
        self.bar = TrainingBar(self.total_steps, self.step, self.validations_after, disable=not self.run.writer)
        val_loss, batches = None, self.batches()
        self.launched_at = time.perf_counter()
        while self.step < self.total_steps:
            loss, events = self.train_step(batches)
            # launch to launch: the host runs at most one step ahead of the device, so this is the step's time
            now = time.perf_counter()
            seconds, self.launched_at = now - self.launched_at, now
            self.rank_history.extend(events)
            record = {"lr": self.optimizer.param_groups[0]["lr"], **self.step_fields()}
            self.pending.append((self.step, loss, record, self.shown_fields(), events, seconds))
            self.settle(keep=1)   # the previous step's loss, read while this one runs
            validate = self.validation_due(self.step)
            signum = self.stop.requested(self.world, self.device)
            if validate or self.step % a.save_every == 0 or signum:
                self.settle()
                if validate:
                    with self.bar.validating():
                        val_loss = self.end_of_validation_period()
                    if val_loss is not None:
                        self.shown = {"val": f"{val_loss:.4f}"}
                        self.bar.write(f"step {self.step}: validation loss {val_loss:.4f} (best {self.best_val:.4f})")
                self.save_checkpoint()
                self.launched_at = time.perf_counter()   # step times count training only
            if signum and self.step < self.total_steps:
                self.bar.close()
                raise Interrupted(signum, self.step)
        self.settle()
        self.bar.close()
        if self.run.writer:
            self.finish(val_loss)
        if self.world > 1:
            dist.barrier()
        return self.run.path
