"""Concept Lab catalogue jobs: many subjects, many ComfyUI servers, on Ray, resumable.

A catalogue is a folder (or CSV) of subjects, each with a name, 3-10 photos and a class prompt.
For every subject the job runs, on one of its ComfyUI servers and through that server's own HTTP
API, the pack's example workflows filled in for the subject:

* ``concept_extract_then_save``: Concept Neurons Extract from the photos, then Save;
* ``concept_load_apply_sample``: each of the job's scene prompts rendered with the concept
  applied, through ``seed_select_then_custom_advanced`` (Seed Search) where the subject asks;
* ``saliency_unet_heatmaps``: the subject word's saliency mask for every image, which must cover
  the subject, else the image is flagged.

Ray distributes the work: every ComfyUI server is a Ray actor that owns one server URL (or
starts a local server on its GPU), and each subject is a task on one of them. A SQLite ledger
in the output folder records every subject's state and the hashes of its outputs, so a job
that is killed, or loses a server, resumes where it stopped.

This package never imports ComfyUI (it talks HTTP), nor the node pack; the node pack never
imports this package or Ray. Run it as ``python -m conceptlab_catalogue run job.toml`` from the
pack's folder, or ``bash scripts/lab.sh catalogue run job.toml`` in a developer checkout.

Python API::

    from conceptlab_catalogue import run_job
    summary = run_job("job.toml")            # or a dict with the same keys as the TOML file
    print(summary.done, summary.failed, summary.report)
"""
from __future__ import annotations

from .config import ConfigError, JobConfig, load_config

__all__ = ["ConfigError", "JobConfig", "load_config", "run_job"]


def run_job(config, **kwargs):
    """Run (or resume) a catalogue job; see :func:`conceptlab_catalogue.job.run` for the
    keyword arguments. Needs Ray (``pip install -r conceptlab_catalogue/requirements.txt``)."""
    from .job import run
    return run(config, **kwargs)
