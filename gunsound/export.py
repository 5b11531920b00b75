"""A self-contained scoring pipeline (Hydrogen Torch's build_scoring_pipelines).

`gunsound export RUN OUT` writes:
    OUT/model.pt2       a torch.export program: waveform windows (batch, samples) -> per-class probabilities;
                        the log-mel front end and every fold model inside, averaged; any batch size
    OUT/pipeline.json   sample rate, labels, the scoring settings (window, hop, threshold...), how it was made
    OUT/score.py        a scorer that needs torch, numpy, pandas, scipy and soundfile (torchaudio only to
                        resample), not Ray and not this repository:
                            python score.py AUDIO [AUDIO ...] [--out DIR]
                        It writes the job's three tables as DIR/windows.csv, files.csv and events.csv,
                        file by file (a rerun into DIR resumes).
    OUT/windows.py, onsets.py, events.py, decode.py
                        the scoring job's own chunk plan, shot detector, per-file summary and audio reader:
                        copies of the package's modules, which import no gunsound module and no Ray

score.py is `gunsound/exported/score.py`, a file of the package, checked by ruff like the rest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from gunsound import decode, events, onsets, storage, windows
from gunsound.inference import CPU_MODEL_WINDOWS, load_scoring_model
from gunsound.scoring import ScoringSettings, scoring_config

PACKAGE = Path(__file__).resolve().parent
# The files of the exported scorer: its program, and the job's modules it imports by their flat names.
SCORER_FILES = [PACKAGE / "exported" / "score.py", *(Path(m.__file__) for m in (windows, onsets, events, decode))]


def export_pipeline(run: str, out: str, overrides: list[str] | None = None) -> dict:
    """Write the self-contained pipeline for a run (or fold, or model.pt) to OUT (local or s3://)."""
    cfg = scoring_config(run, list(overrides or []))
    model = load_scoring_model(run)
    settings = ScoringSettings.from_config(cfg, model_chunk_seconds=model.chunk_seconds)
    ensemble = model.build()
    example = torch.zeros(2, int(round(settings.window_seconds * model.features.sample_rate)))
    # torch.export, not TorchScript (deprecated as of torch 2.11); the batch dimension stays free.
    program = torch.export.export(ensemble, (example,),
                                  dynamic_shapes={"waves": {0: torch.export.Dim("batch", min=1)}})
    spec = {
        "format": "gunsound scoring pipeline v3",
        "model": "model.pt2",
        "classes": model.classes,
        "sample_rate": model.features.sample_rate,
        "scoring": asdict(settings),  # method, window_seconds, hop_seconds, read_seconds, threshold, ...
        # Windows per call of the model: the exported scorer runs on a CPU, so the job's CPU scorer's calls.
        "model_windows": min(settings.batch_size, CPU_MODEL_WINDOWS),
        "features": asdict(model.features),
        # Which fold files went in, by their place in the run: the full source locations (bucket names,
        # home folders) stay with whoever exported, not with everyone the pipeline is handed to.
        "models": ["/".join(uri.replace("\\", "/").rsplit("/", 2)[-2:]) for uri in model.sources],
    }
    with tempfile.TemporaryDirectory(prefix="gunsound-export-") as staging:
        local = Path(out) if storage.is_local(out) else Path(staging)
        local.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(local / "model.pt2"))
        (local / "pipeline.json").write_text(json.dumps(spec, indent=1))
        for source in SCORER_FILES:
            shutil.copyfile(source, local / source.name)
        if not storage.is_local(out):
            storage.upload_dir(local, out)
    return spec
