"""The recipe reference: one line per key. ``docs/config.md`` and ``efpn config show``
are generated from it (a test keeps the file in step)."""

from __future__ import annotations

__all__ = ["INTRO", "SECTIONS", "key_help", "render_markdown"]

INTRO = "# Recipe reference\n\nA recipe is a YAML file (read with `yaml.safe_load`; nothing in it is evaluated) that\nmaps onto the dataclasses of `efpn/config.py`. Every key is optional; an unknown key,\na value of the wrong type (`epochs: 1.5`, `lr: fast`) or out of range (`lr: 0`,\n`batch_size: 0`, `lr: .nan`) stops the command with one line naming the file and the\nkey. `lr: 1e-3`, which YAML reads as a string, is accepted as the number. The resolved\nrecipe is written to every run folder as `config.yaml`.\n\nShipped recipes (also inside the package, so `efpn demo` finds its own):\n`configs/demo.yaml` (SynthSigns, `make demo`), `configs/synthsigns_s256.yaml` (the\ndemo recipe at S = 256 that the SynthSigns studies up to session 11 ran), `configs/aerial_cars.yaml` (aerial cars\nnear native resolution), `configs/aerial_cars_half.yaml` (aerial cars at half\nresolution, the teacher on the native pixels), `configs/aerial_cars_quarter.yaml`\n(aerial cars at a quarter of native resolution, the teacher at half, AP over cars),\n`configs/demo_test.yaml` (a held-out SynthSigns test set for `efpn demo` and `efpn\nstudy --test`: only its val split is read),\n`configs/aerial_cars_val_cars.yaml` (the aerial cars val split with AP over cars only,\nfor a second evaluation of an aerial study with `--test`).\n\n"

#: (title, text before the table, rows of (keys, default, meaning)); keys are
#: back-quoted names, comma-separated where several share a row
SECTIONS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    [
        "Top level",
        "",
        [
            [
                "`name`",
                "`efpn`",
                "run name; `efpn train` writes to `runs/<name>` unless `--out` is given. A plain folder name (letters, digits, `_ . -`).",
            ],
            [
                "`seed`",
                "`0`",
                "training seed (weights, sampling order, augmentation). `efpn study --seeds N` uses seed, seed+1, ...",
            ],
            [
                "`device`",
                "`auto`",
                "`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`. `cuda` without a GPU is an error.",
            ],
            [
                "`eval_score_thresh`",
                "`0.5`",
                "score threshold of the TT100K-style accuracy/recall figures (F1_S is always the best over thresholds).",
            ],
            [
                "`eval_size_reference`",
                "`source`",
                "where object sizes are measured for the size bins: `source` (the image files' pixels, the TT100K protocol) or `model` (the pixels the model sees at its test size; for data stored at a higher resolution than the model runs at).",
            ],
            [
                "`premise_check`",
                "`true`",
                "after stage 1, evaluate its FPN on val at S and 2S, write `premise.json` and say whether a 2x view helps small objects (EFPN's premise).",
            ],
            [
                "`checkpoint_every`",
                "`200`",
                "write `last.pt` every this many steps (and at every epoch end); 0: only at epoch ends.",
            ],
            [
                "`log_every`",
                "`10`",
                "when the output is not a terminal, a timestamped progress line every this many steps (in place of progress bars).",
            ],
        ],
    ],
    [
        "`data`",
        "",
        [
            [
                "`format`",
                "`synth`",
                "`coco`, `yolo`, `voc`, `tt100k`, `dota`, `visdrone`, `geojson` (GIS polygons over "
                "georeferenced scenes), or `synth` (SynthSigns, generated under `runs/`).",
            ],
            [
                "`train`, `val`",
                '`""`',
                "the dataset of each split: a COCO JSON, a YOLO/VOC/TT100K folder. `val` defaults to `train` (with another split name).",
            ],
            [
                "`image_root`",
                "`null`",
                "COCO: folder the `file_name`s are relative to (default: the JSON's folder).",
            ],
            [
                "`train_split`, `val_split`",
                "`train`, `val`",
                "YOLO (`splits.json`), VOC (`ImageSets/Main/<split>.txt`), TT100K split names; DOTA and VisDrone: the subfolder `<root>/<split>` when it exists.",
            ],
            [
                "`classes`",
                "`null`",
                "the class list, comma-separated (YOLO, VOC, DOTA: instead of the dataset's own file; TT100K: `tt100k45`, the 45 evaluated classes, or a list).",
            ],
            [
                "`keep_other`",
                "`false`",
                "TT100K: also train on the classes outside `classes` (evaluation still counts `classes` only, COCO AP included).",
            ],
            [
                "`eval_classes`",
                "`null`",
                "comma-separated classes that evaluation counts (COCO AP, AR and the TT100K figures, best-epoch selection and the premise check included); training still sees every class. For data where a few objects of rare classes would weigh as much in COCO's mean over classes as thousands of a common one (aerial cars: 510 cars, 5 buses and 4 minibuses in val). `null`: every class (TT100K: `classes`).",
            ],
            [
                "`val_fraction`",
                "`0.0`",
                "for data without a split: hold out this fraction of `train` as val (sorted by file name, shuffled with `split_seed`; the same call gives the same split). 0: use `val`. A `val` other than `train` needs 0 (refused otherwise); `efpn train --data DATA data.val=V` sets it to 0 itself.",
            ],
            ["`split_seed`", "`0`", "seed of the `val_fraction` hold-out."],
            ["`synth_train`, `synth_val`", "`200`, `50`", "SynthSigns image counts."],
            [
                "`synth_size`",
                "`512`",
                "SynthSigns image side; render it at 2x the model's `min_size` so the source holds detail the 1x view loses.",
            ],
            [
                "`synth_seed`",
                "`0`",
                "SynthSigns generator seed (the data; `seed` is the training's).",
            ],
            ["`hflip`", "`0.0`", "horizontal flip probability (0 for signs whose meaning flips)."],
            [
                "`color_jitter`",
                "`0.0`",
                "brightness/contrast/saturation strength; also shifts hue by up to a quarter of it unless `hue_jitter` says otherwise.",
            ],
            [
                "`hue_jitter`",
                "`null`",
                "hue shift strength (0..0.5; null: `color_jitter / 4`). The hue shift is most of the jitter's cost (an RGB-HSV round trip per pixel on the full-size image): 0 makes data loading several times cheaper, which matters on CPU with large images.",
            ],
            [
                "`scale_jitter`",
                "`[]`",
                "stage 1 only: sizes drawn per batch in place of `model.min_size` (multi-scale training; span S..2S so the same FPN works at 2S). Stages 2-3 train at S.",
            ],
            ["`crop`", "`0.0`", "probability of a random IoU crop."],
            [
                "`balance_per_class`",
                "`0`",
                "TT100K-style class balancing: crops per class per epoch (0: off).",
            ],
            ["`balance_crop`", "`512`", "side of the balancing crops."],
            ["`workers`", "`0`", "data-loader worker processes."],
        ],
    ],
    [
        "`model`",
        "",
        [
            [
                "`backbone`",
                "`resnet18`",
                "`resnet18/34/50/101/152`, `resnext50_32x4d`, `resnext101_32x8d`.",
            ],
            [
                "`fpn_channels`",
                "`256`",
                "pyramid channels (the paper's 256; 64 for CPU-sized models).",
            ],
            ["`representation_size`", "`1024`", "width of both box heads."],
            [
                "`sr_module`",
                "`ftt`",
                "how P'3 is super-resolved: `ftt` (paper), `espcn`, `nearest` (Table II).",
            ],
            ["`sr_width`", "`null`", "FTT/ESPCN extractor width (`null`: `fpn_channels`)."],
            ["`ftt_blocks`", "`2`", "residual blocks in FTT's content and texture extractors."],
            [
                "`ftt_input`",
                "`output`",
                "FTT reads the FPN outputs (`output`, paper) or the inner lateral sums (`inner`, authors' code).",
            ],
            [
                "`ext_out_width`",
                "`null`",
                "a cheaper 1x1-3x3-1x1 P'2 output conv of this hidden width (`null`: the paper's 3x3).",
            ],
            [
                "`small_roi_size`",
                "`56.0`",
                "RoIs with sqrt(area) below this many input pixels are pooled from P'2 by the small head.",
            ],
            [
                "`merge`",
                "`exclusive`",
                "at inference, small RoIs go only to the P'2 head (`exclusive`, the paper), to both heads (`duplicate`), to both with each head kept where the detected box is of its size (`gated`: the P'2 head for boxes under `small_roi_size`, the original head above), or to both with their class probabilities and box deltas averaged where the averaged box is small and the original head's detection kept where it is not (`fused`: the small objects' scores stay on the original head's scale).",
            ],
            ["`rpn_on_p2x`", "`false`", "also run the RPN on P'2 with a 16-px anchor."],
            [
                "`min_size`, `max_size`",
                "`512`, `512`",
                "the test scale S: shorter side, and cap on the longer side (torchvision's rule).",
            ],
            [
                "`resize_scale`",
                "`null`",
                "resize every image by this factor at S instead (0.5: half the native resolution; one ground sample distance for aerial images); `min_size` is then the reference that `scale_jitter` and `val --scale` scale, `max_size` still caps the longer side.",
            ],
            [
                "`anchor_sizes`",
                "`[32, 64, 128, 256, 512]`",
                "one anchor size per pyramid level P2..P6 (three aspect ratios each).",
            ],
            [
                "`trainable_backbone_layers`",
                "`3`",
                "0-5 backbone stages trained in stage 1 (5 from scratch).",
            ],
            [
                "`norm_layer`",
                "`frozen`",
                "stage 1's norm: `frozen` (ImageNet statistics) or `batchnorm` (from scratch). Stages 2-3 always freeze it.",
            ],
            ["`sync_bn`", "`false`", "SyncBatchNorm across GPUs under torchrun."],
            [
                "`p2x_mode`",
                "`auto`",
                "how P'2 is computed at inference: `sparse`, `banded`, `dense` or `auto` (sparse on CPU, banded on CUDA); same detections.",
            ],
            [
                "`sparse_max_coverage`",
                "`0.5`",
                "sparse mode computes the whole map when its windows would cover more than this fraction.",
            ],
            [
                "`p2x_band_rows`",
                "`null`",
                "band height in stride-2 rows (`null`: 32 on CPU, 128 on CUDA; 0: one pass).",
            ],
            [
                "`weights_backbone`",
                "`null`",
                "ImageNet weights: a torchvision weights name (downloaded by torchvision) or a local state-dict file.",
            ],
            ["`rpn_post_nms_top_n_test`", "`1000`", "proposals kept per image at test time."],
            ["`box_score_thresh`", "`0.05`", "detections below this score are dropped."],
            ["`box_detections_per_img`", "`100`", "detections kept per image."],
            [
                "`rpn_batch_size_per_image`, `box_batch_size_per_image`",
                "`256`, `512`",
                "anchors and RoIs sampled per image for the losses.",
            ],
        ],
    ],
    [
        "`distill` (stage 2)",
        "",
        [
            [
                "`enabled`",
                "`true`",
                "train the extension by distillation (Eq. 5); `false` trains it, with the small head, by the detection loss alone.",
            ],
            [
                "`teacher_mode`",
                "`upsample_teacher`",
                "the paper's: the teacher (the stage-1 FPN, frozen) sees the source image resized to 2x the student's size, so it holds detail the student's input lacks. `downsample_student` (authors' code): the teacher sees the training scale and the student a 2x2-pooled copy.",
            ],
            [
                "`lam`",
                "`1.0`",
                "lambda of Eq. (8), the foreground term (0: global term only, Table IV).",
            ],
            [
                "`ftt_loss`",
                "`true`",
                "also supervise FTT's output P'3 with the teacher's P3 (Table IV).",
            ],
        ],
    ],
    [
        "`stage1`, `stage2`, `stage3`",
        "",
        [
            [
                "`ohem`",
                "`true`",
                "stage 3: train the P'2 head with online hard example mining: a no-grad pass "
                "ranks every small RoI, and only the selected ones are back-propagated.",
            ],
            [
                "`ohem_batch_size_per_image`",
                "`128`",
                "RoIs OHEM keeps per image (a quarter positives at most).",
            ],
            [
                "`unfreeze_extension`",
                "`false`",
                "stage 3 also trains the extension (FTT, C'2 lateral, P'2 conv), as the authors' code.",
            ],
            [
                "`train_all`",
                "`false`",
                "stage 3 trains the whole detector (backbone, pyramid, extension, RPN and both "
                "box heads, batch norm kept frozen) on every loss, not only the P'2 head: not "
                "in the paper; the FPN keeps learning while the extension does, as an FPN "
                "trained for the same epochs would. With a merge other than `exclusive` the "
                "original head also trains on small RoIs, which it scores at inference.",
            ],
            [
                "`init`",
                "`null`",
                "checkpoint to start the stage from (stage 1: a trained detector, e.g. torchvision's; later stages default to the previous stage's `best.pt`).",
            ],
            ["`optim.optimizer`", "`sgd`", "`sgd` or `adamw`."],
            ["`optim.lr`", "`0.02`", "peak learning rate (positive)."],
            ["`optim.momentum`", "`0.9`", "SGD momentum."],
            ["`optim.weight_decay`", "`1e-4`", "weight decay."],
            ["`optim.epochs`", "`12`", "epochs (a whole number, 1 or more)."],
            ["`optim.batch_size`", "`2`", "images per step (per process under torchrun)."],
            ["`optim.warmup_iters`", "`100`", "linear warm-up steps."],
            [
                "`optim.schedule`",
                "`step`",
                "`step` (decay by `gamma` at `milestones`) or `cosine`.",
            ],
            [
                "`optim.milestones`",
                "`[0.67, 0.89]`",
                "step schedule: fractions of training where the rate decays.",
            ],
            ["`optim.gamma`", "`0.1`", "step schedule decay factor."],
            ["`optim.clip_grad`", "`10.0`", "gradient-norm clip (0: off)."],
            ["`optim.amp`", "`true`", "mixed precision on CUDA."],
            [
                "`optim.max_bad_steps`",
                "`5`",
                "non-finite losses in a row that abort the run with a message.",
            ],
        ],
    ],
]


def render_markdown() -> str:
    """``docs/config.md``."""
    out = [INTRO.rstrip("\n"), ""]
    for title, pre, rows in SECTIONS:
        out += [f"## {title}", ""]
        if pre:
            out += [pre, ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        out += [f"| {k} | {d} | {m} |" for k, d, m in rows]
        out.append("")
    return "\n".join(out)


def _prefixes(title: str) -> list[str]:
    if title.startswith("Top level"):
        return [""]
    if title.startswith("`stage1`"):
        return ["stage1.", "stage2.", "stage3."]
    return [title.split("`")[1] + "."]


def key_help() -> dict[str, str]:
    """Dotted key -> its one-line meaning."""
    helps = {}
    for title, _, rows in SECTIONS:
        for keys, _, meaning in rows:
            for key in (k.strip().strip("`") for k in keys.split(",")):
                for prefix in _prefixes(title):
                    helps[prefix + key] = meaning
    return helps
