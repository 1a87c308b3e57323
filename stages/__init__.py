"""The pipeline's stages, each declared once: the function it runs, what it reads and writes
under the data root, the params it depends on, the files its params name, and its help.

The CLI (``clipscrub <stage>``), the Prefect flow (its tasks and cache keys) and dvc.yaml
(``clipscrub dvc-yaml``) are derived from ``STAGES``; a stage's code dependencies are the
modules it really imports (``clipscrub.dag.imported_modules``).
"""

from __future__ import annotations

from clipscrub.dag import Output, Stage

# what the stages write, by name, relative to the data root (``data/`` in the DVC pipeline)
OUTPUTS: dict[str, Output] = {
    "raw": Output("raw"),
    "model": Output("model"),
    "train_metrics": Output("metrics/train.json", "metric"),
    "embeddings": Output("embeddings"),
    "index": Output("index"),
    "scores": Output("scores"),
    "flags": Output("flags"),
    "clean": Output("clean"),
    "detection_metrics": Output("metrics/detection.json", "metric"),
    "applied_metrics": Output("metrics/applied.json", "metric"),
    "plots": Output("plots", "plots", {
        "roc": {"x": "fpr", "y": "tpr", "template": "simple"},
        "hist": {"x": "score", "y": "poisoned", "template": "linear"},
        "pr": {"x": "recall", "y": "precision", "template": "simple"},
    }),
    "report": Output("report"),
}

# the keys of each source's files: a stage reading the source reads only the one in use
SOURCE_FILES = ("download.urls.path", "download.shards.path", "download.folder.path", "download.folder.captions",
                "download.embeddings.path")

STAGES: tuple[Stage, ...] = (
    Stage(
        name="download", run="clipscrub.stages.download:download_dataset",
        help="materialise the dataset as webdataset shards + manifest.parquet",
        example="-S download.synthetic.num_samples=2000",
        paths={"out_dir": "raw"}, outputs=("raw",),
        settings={"settings": "download", "base": "base"}, params=("base", "download"),
        files=SOURCE_FILES,
    ),
    Stage(
        name="train", run="clipscrub.stages.train:train_model",
        help="train the demo's tiny victim CLIP (demo only: runs when train.enabled is true)",
        example="-S train.epochs=5",
        paths={"raw_dir": "raw", "out_dir": "model", "metrics_path": "train_metrics"},
        outputs=("model", "train_metrics"),
        settings={"settings": "train", "download": "download", "base": "base"}, params=("base", "download", "train"),
        when="train.enabled",
    ),
    Stage(
        name="embed", run="clipscrub.stages.embed:embed_dataset",
        help="image and caption embeddings with an open_clip model",
        example="-S embed.batch_size=128",
        # the demo embeds with the victim train wrote (model_dir); otherwise the model embed names
        paths={"raw_dir": "raw", "model_dir": "model", "out_dir": "embeddings"}, outputs=("embeddings",),
        settings={"settings": "embed", "base": "base", "model_name": "train.model_name"},
        params=("base", "embed", "train.enabled", "train.model_name"),
        files=("embed.checkpoint", "embed.model_config", "download.embeddings.path"),
    ),
    Stage(
        name="index", run="clipscrub.stages.index:build_index",
        help="draw reference sets and find each sample's k nearest references (faiss)",
        example="-S index.reference.draws=3",
        paths={"embeddings_dir": "embeddings", "out_dir": "index"}, outputs=("index",),
        settings={"settings": "index", "base": "base"}, params=("base", "index"),
        files=("index.reference.path",),
    ),
    Stage(
        name="score", run="clipscrub.stages.score:score_samples",
        help="k-distance, SLOF, DAO, LID, isolation forest and CLIP score per sample",
        example="-S \"score.detectors=[kdist, dao]\"",
        paths={"embeddings_dir": "embeddings", "index_dir": "index", "out_dir": "scores"}, outputs=("scores",),
        settings={"settings": "score", "index": "index", "base": "base"}, params=("base", "index", "score"),
    ),
    Stage(
        name="threshold", run="clipscrub.stages.threshold:threshold_scores",
        help="flag samples from one detector's scores",
        example="-S threshold.tail_fdr=0.05",
        paths={"scores_dir": "scores", "out_dir": "flags"}, outputs=("flags",),
        settings={"settings": "threshold", "base": "base"}, params=("base", "threshold"),
    ),
    Stage(
        name="filter", run="clipscrub.stages.filter:filter_dataset",
        help="write the cleaned dataset, removed.parquet and lineage.json; applies the review lists "
             "(filter.keep_ids: flagged samples to keep, filter.remove_ids: samples to remove; one entry per line, "
             "by id, key, file or url; the report links ready-made ones)",
        example="-S filter.keep_ids=review/keep_ids.txt",
        paths={"raw_dir": "raw", "scores_dir": "scores", "flags_dir": "flags", "out_dir": "clean"},
        outputs=("clean",),
        # the whole params: filter checks that its inputs were made with these params. It depends on
        # its own section: the others reach it through its inputs, whose lineage records them
        settings={"settings": "filter", "params": "*"},
        params=("base", "filter"),
        files=("filter.keep_ids", "filter.remove_ids"),
    ),
    Stage(
        name="evaluate", run="clipscrub.stages.evaluate:evaluate_detectors",
        help="AUROC / PR-AUC / FPR@TPR per detector against known poison (DVC metrics and plots)",
        example="-S evaluate.tpr=0.9",
        # evaluate and report count what filter removed: the flags after a person's review lists
        paths={"raw_dir": "raw", "scores_dir": "scores", "flags_dir": "flags", "clean_dir": "clean",
               "metrics_path": "detection_metrics", "applied_path": "applied_metrics", "plots_dir": "plots"},
        outputs=("detection_metrics", "applied_metrics", "plots"),
        settings={"settings": "evaluate", "threshold": "threshold", "base": "base"},
        params=("base", "threshold", "evaluate"),
        files=("evaluate.truth",),
    ),
    Stage(
        name="report", run="clipscrub.stages.report:write_report",
        help="one self-contained HTML page: histograms, ROC/PR, top flagged samples, clusters, lineage",
        example="-S report.top_n=96",
        paths={"raw_dir": "raw", "embeddings_dir": "embeddings", "index_dir": "index", "scores_dir": "scores",
               "flags_dir": "flags", "clean_dir": "clean", "out_dir": "report"},
        outputs=("report",),
        settings={"settings": "report", "threshold": "threshold", "base": "base", "truth_path": "evaluate.truth"},
        params=("base", "threshold", "report", "evaluate.truth"),
        files=("evaluate.truth",),
    ),
)
