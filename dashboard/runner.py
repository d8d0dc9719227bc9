"""Background generation runs started from the dashboard: one worker thread, progress per frame, results added
to :class:`dashboard.sources.Sources` when done (so the runtime and frames views pick them up).

The page never waits on a run: :meth:`RunManager.start` returns at once and the page polls
:meth:`RunManager.status` (a ``dcc.Interval``). Generation itself is :func:`packcache.runtime.generate_video`.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dashboard.sources import RunCurves, Sources, run_curves

__all__ = ["POLICIES", "BUDGETS", "RunRequest", "Job", "RunManager", "ProgressPolicy"]

#: Policies the run control offers (StreamingLLM gets the PackCache budget's token count: equal memory).
POLICIES = ("PackCache", "FullCache", "SlidingWindow", "StreamingLLM")
#: Budget choices: the loaded (fitted) budget, or the paper's rho = 1/2, W = 4 rule.
BUDGETS = ("loaded", "paper")


@dataclass(frozen=True)
class RunRequest:
    """What to generate: policy and budget choice, number of frames (condition included) and AR-DF steps."""

    policy: str = "PackCache"
    budget: str = "loaded"
    frames: int = 8
    steps: int = 4

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if not 2 <= int(self.frames) <= 64:
            raise ValueError(f"frames must lie in [2, 64], got {self.frames}")
        if not 1 <= int(self.steps) <= 64:
            raise ValueError(f"steps must lie in [1, 64], got {self.steps}")


@dataclass
class Job:
    """State of one background run (read by the page while it runs)."""

    id: int
    request: RunRequest
    status: str = "queued"  # queued | running | done | error
    frame: int = 0
    total: int = 0
    message: str = ""
    run: RunCurves | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "frame": self.frame, "total": self.total,
                "message": self.message, "run": self.run.name if self.run else None}


class ProgressPolicy:
    """Wraps a cache policy and reports each frame boundary (``compact(k)`` calls ``keep(slots, k)``)."""

    def __init__(self, inner: Any, on_frame) -> None:
        self.inner = inner
        self.on_frame = on_frame

    def keep(self, slots, next_frame: int):
        self.on_frame(int(next_frame))
        return self.inner.keep(slots, next_frame)

    def budget_tokens(self, layout):
        return self.inner.budget_tokens(layout)

    def check(self, layout, *, num_layers: int, num_kv_heads: int) -> None:
        self.inner.check(layout, num_layers=num_layers, num_kv_heads=num_kv_heads)

    @property
    def name(self) -> str:
        return self.inner.name


class RunManager:
    """Starts :func:`~packcache.runtime.generate_video` runs on the demo model in a worker thread, one at a time.

    The model is the checkpoint in ``sources.model_dir`` when there is one, else a randomly initialised demo
    model (noted in the job message). Prompt and condition frame come from the first recorded full-cache run
    (so the frames view can compare against it), else from demo clip ``seed``.
    """

    def __init__(self, sources: Sources, *, save_dir: str | Path | None = None, seed: int = 0) -> None:
        self.sources = sources
        self.save_dir = Path(save_dir) if save_dir else None
        self.seed = seed
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._next = 1
        self._model = None
        self._model_note = ""
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------------
    def start(self, request: RunRequest) -> Job:
        """Queue a run and return its job at once; raises ``ValueError`` for a bad request or a busy worker."""
        request.validate()
        with self._lock:
            if any(j.active for j in self._jobs.values()):
                raise ValueError("a run is already in progress; wait for it to finish")
            job = Job(self._next, request, total=int(request.frames))
            self._next += 1
            self._jobs[job.id] = job
            self._thread = threading.Thread(target=self._work, args=(job,), name=f"packcache-run-{job.id}",
                                            daemon=True)
            self._thread.start()
        return job

    def status(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def wait(self, job_id: int, timeout: float | None = None) -> Job | None:
        """Block until the job ends (for scripts and tests; the page polls instead)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status(job_id)

    # ----------------------------------------------------------------------------------------------------
    def _load_model(self):
        if self._model is None:
            import torch

            from packcache.demo.model import DemoVideoConfig, DemoVideoModel, load_demo_model

            model_dir = self.sources.model_dir
            if model_dir is not None and (model_dir / "config.json").is_file():
                self._model = load_demo_model(model_dir)
                self._model_note = f"model {model_dir.name}"
            else:
                torch.manual_seed(0)
                self._model = DemoVideoModel(DemoVideoConfig()).eval()
                self._model_note = "untrained demo model (random weights: no checkpoint in data/demo-model)"
        return self._model

    def _inputs(self, frames: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Prompt ids, condition frame and generation settings shared with the recorded reference run."""
        from packcache.demo.clips import make_clip

        for run in self.sources.runs:
            if run.is_full and run.video is not None and run.meta.get("prompt"):
                keys = ("cfg_scale", "temperature", "history_mask_ratio", "seed", "mode", "rebase")
                settings = {k: run.meta[k] for k in keys if k in run.meta}
                return np.asarray(run.meta["prompt"]), np.asarray(run.video.frames[0]), settings
        clip = make_clip(self.seed, frames)
        return clip.text, clip.frames[0], {}

    def _policy(self, request: RunRequest, model, layout):
        from packcache.budget import Budget
        from packcache.policies import FullCache, PackCache, SlidingWindow, StreamingLLM

        config = model.config
        budget = self.sources.budget if request.budget == "loaded" else None
        if budget is None:
            budget = Budget.paper_default(config.num_hidden_layers, config.num_attention_heads,
                                          config.num_key_value_heads, layout.summary(), model_id="demo")
        pack = PackCache(budget)
        if request.policy == "PackCache":
            return pack
        if request.policy == "FullCache":
            return FullCache()
        if request.policy == "SlidingWindow":
            return SlidingWindow(1)
        return StreamingLLM(max_tokens=int(pack.budget_tokens(layout)))

    def _work(self, job: Job) -> None:
        req = job.request
        try:
            import torch

            from packcache.demo.clips import ClipFormat, clip_layout
            from packcache.runtime import generate_video

            self._set(job, status="running", message="loading the model")
            model = self._load_model()
            text, cond, settings = self._inputs(int(req.frames))
            layout = clip_layout(int(req.frames), text_tokens=len(text), clip_format=ClipFormat.of(model.config))
            policy = self._policy(req, model, layout)
            note = self._model_note
            if req.budget == "loaded" and self.sources.budget is None and req.policy in ("PackCache", "StreamingLLM"):
                note += "; no budget loaded: the paper budget is used"

            def on_frame(k: int) -> None:
                self._set(job, frame=k, message=f"frame {k}/{req.frames - 1} ({note})")

            self._set(job, message=f"generating ({note})")
            seed = int(settings.pop("seed", self.seed))
            with torch.no_grad():
                video = generate_video(model, text, cond, int(req.frames), ProgressPolicy(policy, on_frame),
                                       settings.pop("mode", "masked"), steps=int(req.steps), seed=seed,
                                       progress=False, **settings)
            video.meta["dashboard"] = {"request": dict(req.__dict__), "model": note}
            suffix = f"-{policy.budget_tokens(layout)}tok" if req.policy == "StreamingLLM" else ""
            run = run_curves(video, f"live{job.id}-{policy.name}{suffix}")
            if self.save_dir is not None:
                video.save(self.save_dir / f"{run.name}.json")
            with self._lock:
                self.sources.add_run(run)
                job.run = self.sources.runs[-1]
                job.status, job.frame = "done", int(req.frames)
                job.message = f"{job.run.name} generated {req.frames} frames in {video.total_seconds:.1f} s"
                job.finished = time.time()
        except Exception as exc:  # the page shows the reason; the server keeps running
            msg = " ".join(str(exc).split()) or type(exc).__name__
            self._set(job, status="error", message=f"run failed: {msg}", finished=time.time())
            print(f"packcache-dashboard: run {job.id} failed: {msg}", file=sys.stderr)

    def _set(self, job: Job, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)
