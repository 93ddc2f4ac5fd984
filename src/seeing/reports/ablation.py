"""``python evaluate.py metric=ablation``: the paper-style comparison of variants a-f.

Reads the ``<runs_dir>/reconstruct_<kind>_<variant>*/reconstruction.pt`` of one group of settings
per kind (``python train.py -m stage=reconstruct variant=a,b,c,d,e,f [stage.targets.kind=generated]``;
:mod:`seeing.reports.run_lookup`: the preset's runs, or the only group, or ``metric.settings``),
summarises each like ``metric=reconstruction`` does, and writes one table: a row per
(targets, variant) with pixel (and perceptual) error, latent / layer correlations for
generated targets, segmentation mIoU and missing classes per image. Also
``ablation_missing.csv`` (each run's missing-class ranking), ``ablation_ordering.{csv,md}``
(which of the paper's pairwise claims hold, by per-image pixel L1, with a paired bootstrap
interval and the number of images; under ``metric.min_images`` (16) a claim gets "too few
images" instead of a verdict), ``ablation_equivalent_steps.{csv,md}`` (how many optimisation steps each optimising
variant needs to match each single-pass encoder, drawn in ``ablation_curves_<kind>.png``) and
``ablation_<kind>.png`` (targets next to every variant's reconstruction).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seeing.stages.reconstruct import RESULT_FILE, load_result
from seeing.reporting import to_uint8
from seeing.reporting import WandbReport, save_figure, write_csv, write_json, write_markdown_table

from seeing.reports.missing_objects import most_missing
from seeing.reports.reconstruction import fsd_comparison, missing_settings, summarize
from seeing.reports.run_lookup import choose_runs, find_runs, upstream_files

log = logging.getLogger(__name__)

def variant_text(result: Mapping[str, Any], key: str) -> str:
    """A variant's ``description`` or short ``label``, as its config (conf/variant/) said and its
    result file recorded; the variant's name where the result predates the field."""
    variant = (result.get("meta") or {}).get("variant") or {}
    return str(variant.get(key) or variant.get("name", ""))


# The paper's ordering, as (better, worse) pairs of variants: the full method beats the encoder
# alone and the encoder + z; each layer-wise variant beats every z-only variant of the same or
# lesser effort; the layer-wise encoder alone beats the direct encoder alone.
PAPER_ORDERING = [("f", "d"), ("f", "e"), ("e", "a"), ("e", "b"), ("e", "c"), ("d", "b"), ("d", "a"), ("d", "c")]


def matched_rows(ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[list[int], list[int]]:
    """Row indices into two runs' per-image values for the target images both hold (matched by
    id), in the order of the first run."""
    row_b = {int(i): r for r, i in enumerate(ids_b)}
    pairs = [(r, row_b[int(i)]) for r, i in enumerate(ids_a) if int(i) in row_b]
    return [a for a, _ in pairs], [b for _, b in pairs]


# fewer paired images than this and a claim gets no verdict: a bootstrap over a handful of images
# gives an interval that is itself noise (4 images have 256 distinct resamples)
MIN_IMAGES = 16


def ordering_checks(errors: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], measure: str = "pixel_l1",
                    resamples: int = 2000, seed: int = 0, min_images: int = MIN_IMAGES) -> list[dict[str, Any]]:
    """Each pair of :data:`PAPER_ORDERING` whose runs both exist, per targets kind.

    ``errors[(kind, variant)] = (ids, per-image error)``. The pair is compared on the images
    both runs reconstructed (matched by id): the mean errors, the share of images on which
    the better variant is better, and a paired bootstrap 95 % interval of the mean
    difference (worse - better). ``holds``: the better variant has the lower mean error;
    ``beyond_noise``: the whole interval is above zero (None under ``min_images`` images);
    ``verdict``: the claim in words: holds / holds, within noise / does not hold, or too few
    images.
    """
    rng = np.random.default_rng(seed)
    checks = []
    for kind in dict.fromkeys(k for k, _ in errors):
        for better, worse in PAPER_ORDERING:
            if (kind, better) not in errors or (kind, worse) not in errors:
                continue
            (ids_b, err_b), (ids_w, err_w) = errors[(kind, better)], errors[(kind, worse)]
            rows_b, rows_w = matched_rows(ids_b, ids_w)
            pairs = np.array([(float(err_b[i]), float(err_w[j])) for i, j in zip(rows_b, rows_w)])
            if len(pairs) == 0:
                log.warning("%s: variants %s and %s share no target images; not compared", kind, better, worse)
                continue
            diff = pairs[:, 1] - pairs[:, 0]
            means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
            low, high = np.percentile(means, [2.5, 97.5])
            holds, enough = bool(diff.mean() > 0), len(diff) >= min_images
            beyond = bool(low > 0) if enough else None
            verdict = (("holds" if beyond else "holds, within noise") if holds else "does not hold") if enough \
                else f"too few images ({len(diff)} < {min_images})"
            checks.append({"targets": kind, "claim": f"{better} < {worse}", "images": len(diff), "verdict": verdict,
                           "measure": measure, "better": float(pairs[:, 0].mean()), "worse": float(pairs[:, 1].mean()),
                           "better_wins": float((diff > 0).mean()), "diff_ci_low": float(low),
                           "diff_ci_high": float(high), "holds": holds, "beyond_noise": beyond})
    return checks


def equivalent_steps(curves: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
                     single: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
                     starts: Mapping[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """What one forward pass of an encoder is worth in optimisation steps.

    ``curves[(kind, variant)] = (ids, pixel L1 per image and step)`` of the optimising runs;
    ``single[(kind, variant)] = (ids, pixel L1 per image)`` of the single-pass runs (no
    optimisation). For every pair of the same targets kind, on the images both reconstructed:
    the first step at which the optimising variant's mean pixel L1 is at or below the
    single-pass variant's (``steps_to_match``; step t is the error after t updates), or None
    when it never gets there within its run. Images whose curve stopped (non-finite loss)
    are left out of the mean from that step on. ``starts[(kind, variant)]`` names where a run's
    latent came from; a run that starts from the single-pass one's output (c from b, e and f
    from d) matches it at step 0 by construction and is not listed.
    """
    starts = starts or {}
    rows = []
    for (kind, opt), (ids_o, curve) in curves.items():
        for (kind_s, one), (ids_s, err) in single.items():
            start = starts.get((kind, opt))
            if kind_s != kind or (start is not None and start == starts.get((kind_s, one))):
                continue
            rows_s, rows_o = matched_rows(ids_s, ids_o)
            if not rows_s:
                log.warning("%s: variants %s and %s share no target images; not compared", kind, one, opt)
                continue
            mean_curve = curve[rows_o].float().nanmean(0)
            target = float(np.mean([float(err[r]) for r in rows_s]))
            reached = torch.nonzero(mean_curve <= target).flatten()
            rows.append({"targets": kind, "single_pass": one, "single_pass_pixel_l1": target, "optimised": opt,
                         "images": len(rows_s), "steps_run": int(curve.shape[1]),
                         "pixel_l1_at_start": float(mean_curve[0]) if len(mean_curve) else None,
                         "steps_to_match": int(reached[0]) if len(reached) else None})
    return sorted(rows, key=lambda r: (r["targets"], r["single_pass"], r["optimised"]))


def curves_figure(kind: str, curves: Mapping[str, torch.Tensor], single: Mapping[str, float], path: Path,
                  labels: Mapping[str, str] = {}) -> Path:
    """Mean pixel L1 against optimisation step for each optimising variant, with each
    single-pass variant's error as a dashed level: where a curve crosses a level is
    ``steps_to_match``. The legend sits beside the axes, never over the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8.0, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(sorted(curves)):
        ax.plot(curves[v].float().nanmean(0).numpy(), lw=1.6, color=colors[i % len(colors)],
                label=f"{v}: {labels.get(v, v)}")
    for v in sorted(single):
        ax.axhline(single[v], ls="--", lw=1.2, color="black" if v == "d" else "grey",
                   label=f"{v}: {labels.get(v, v)} (one pass)")
    ax.set_yscale("log")
    # labelled ticks at 1, 2 and 5 of every decade: a log axis spanning less than a decade has some
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(ticker.LogLocator(base=10, subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="major", axis="y", lw=0.4, alpha=0.5)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("mean pixel L1 (log scale)")
    ax.set_title(f"ablation on {kind} targets: error against effort", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def comparison_figure(kind: str, results: dict[str, dict[str, Any]], path: Path, rows: int = 6) -> Path:
    """Rows of images: the target, then each variant's final reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(results)
    first = results[variants[0]]
    n = min(rows, first["targets"].shape[0])
    cols = [("target", first["targets"][:n])] + [(f"{v}: {variant_text(results[v], 'label')}",
                                                  results[v]["final"][:n]) for v in variants]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n + 0.4), squeeze=False)
    for j, (name, images) in enumerate(cols):
        pics = to_uint8(images)
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(pics[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    fig.suptitle(f"ablation on {kind} targets", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    import hydra

    from seeing.devices import resolve_device

    m = cfg.metric
    spec = missing_settings(m)
    min_images = m.get("min_images", MIN_IMAGES)
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 2:
        raise ValueError(f"metric.min_images={min_images!r}: give the fewest paired images a claim needs for a "
                         f"verdict (a whole number >= 2; default {MIN_IMAGES})")
    out_dir = Path(cfg.output_dir)
    runs_dir = Path(m.runs_dir)
    # one group of settings per kind (seeing.reports.run_lookup): rows that compare variants, not settings
    chosen = choose_runs(find_runs(runs_dir, m.kinds, m.variants, RESULT_FILE),
                         OmegaConf.to_container(m.settings) if m.get("settings") else None, bool(m.get("mix", False)))
    found = {(r.kind, r.variant): r.folder / RESULT_FILE for r in chosen}
    runs = {(r.kind, r.variant): r for r in chosen}
    if not found:
        raise FileNotFoundError(
            f"no reconstruction runs under {runs_dir} (looked for reconstruct_<kind>_<variant>*/{RESULT_FILE}). "
            f"Make them with `python train.py -m {cfg.model.args} stage=reconstruct variant="
            f"{','.join(m.variants)}` (add stage.targets.kind=generated for generated targets).")
    segmenter = hydra.utils.instantiate(cfg.segmenter).to(resolve_device(cfg.get("device", "auto"))).eval()
    rows, missing_rows, by_kind, errors, curves, single, starts = [], [], {}, {}, {}, {}, {}
    for (kind, variant), path in sorted(found.items()):
        result = load_result(path)
        s = summarize(result, segmenter, spec["min_region"], spec["min_support"], int(m.segment_batch_size),
                      str(m.get("perceptual", "none")), m.get("vgg_path"), spec["min_covered"])
        met = s["metrics"]
        row = {"targets": kind, "variant": variant, "method": variant_text(result, "description"),
               "images": met["images"], "steps": met["steps"], "pixel_l1": met["pixel_l1_final"]}
        if "perceptual_final" in met:
            row["perceptual_l1"] = met["perceptual_final"]
        for key in sorted(k for k in met if k.startswith("corr_") and not k.endswith("_initial")):
            row[key] = met[key]
        row["miou"] = met["miou_final"]
        row["missing_per_image"] = met["missing_per_image"]
        row["most_missing"] = " ".join(r["class"] for r in s["most_missing"][:3])
        # what made the row: the run's folder, its settings beyond the preset, the encoder files it started from
        row["settings"] = runs[(kind, variant)].label
        row["run"] = runs[(kind, variant)].folder.name
        row["encoder_files"] = upstream_files(runs[(kind, variant)].record)
        rows.append(row)
        missing_rows += [{"targets": kind, "variant": variant, **r} for r in s["missing"]]
        by_kind.setdefault(kind, {})[variant] = result
        ids = result.get("ids", torch.arange(len(result["final_pixel_l1"])))
        errors[(kind, variant)] = (ids, result["final_pixel_l1"])
        starts[(kind, variant)] = result.get("meta", {}).get("init")
        if not result["positions"]:
            single[(kind, variant)] = errors[(kind, variant)]
        elif "pixel_curves" in result:
            curves[(kind, variant)] = (ids, result["pixel_curves"])
        else:
            log.info("%s: made before pixel curves were recorded; left out of the equivalent steps", path)
        log.info("ablation %s/%s: %s", kind, variant, row)
    # generated-target runs have correlation columns that real ones lack: one column set for all
    columns = list(dict.fromkeys(c for r in rows for c in r))
    rows = [{c: r.get(c) for c in columns} for r in rows]  # None: not measured (W&B tables take None)
    write_csv(out_dir / "ablation.csv", rows)
    write_markdown_table(out_dir / "ablation.md", rows)
    write_csv(out_dir / "ablation_missing.csv", missing_rows)
    figures = {kind: comparison_figure(kind, res, out_dir / f"ablation_{kind}.png", int(m.max_rows))
               for kind, res in by_kind.items()}
    f_missing = most_missing([r for r in missing_rows if r["variant"] == "f" and r["targets"] == "real"])
    comparison = fsd_comparison(f_missing, m.get("fsd_report"), int(m.get("top_k", 5))) if f_missing else None
    ordering = ordering_checks(errors, min_images=min_images)
    write_csv(out_dir / "ablation_ordering.csv", ordering)
    if ordering:
        write_markdown_table(out_dir / "ablation_ordering.md", ordering)
    equivalents = equivalent_steps(curves, single, starts)
    for kind in dict.fromkeys(k for k, _ in curves):
        figures[f"{kind}_curves"] = curves_figure(
            kind, {v: c for (k, v), (_, c) in curves.items() if k == kind},
            {v: float(e.mean()) for (k, v), (_, e) in single.items() if k == kind},
            out_dir / f"ablation_curves_{kind}.png",
            {v: variant_text(r, "label") for v, r in by_kind[kind].items()})
    write_csv(out_dir / "ablation_equivalent_steps.csv", equivalents)
    if equivalents:
        write_markdown_table(out_dir / "ablation_equivalent_steps.md", equivalents)
    from seeing.provenance import current

    write_json(out_dir / "ablation.json", {"rows": rows, "missing": missing_rows, "fsd_comparison": comparison,
                                           "ordering": ordering, "equivalent_steps": equivalents,
                                           "runs": {f"{k}/{v}": {"folder": str(r.folder), "identity": r.record["identity"],
                                                                 "settings": r.settings} for (k, v), r in runs.items()},
                                           "provenance": current()})
    wandb = WandbReport(cfg, job_type="ablation")
    try:
        wandb.log_table("ablation/table", rows)
        wandb.log_table("ablation/missing", missing_rows)
        for kind, fig in figures.items():
            wandb.log_image(f"ablation/{kind}", fig)
        wandb.log_table("ablation/ordering", ordering)
        wandb.log_table("ablation/equivalent_steps", equivalents)
    finally:
        wandb.finish()
    print((out_dir / "ablation.md").read_text())
    for c in ordering:
        print(f"{c['targets']:>9}  {c['claim']}  {c['measure']} {c['better']:.4f} vs {c['worse']:.4f}, better on "
              f"{c['better_wins']:.0%} of {c['images']} images, difference 95% CI [{c['diff_ci_low']:.4f}, "
              f"{c['diff_ci_high']:.4f}]: {c['verdict'].upper() if c['verdict'] == 'does not hold' else c['verdict']}")
    for r in equivalents:
        reach = (f"after {r['steps_to_match']} steps" if r["steps_to_match"] is not None
                 else f"not within its {r['steps_run']} steps")
        print(f"{r['targets']:>9}  {r['optimised']} matches {r['single_pass']}'s one pass (pixel L1 "
              f"{r['single_pass_pixel_l1']:.4f}) {reach}")
    return rows
