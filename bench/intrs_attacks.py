"""IntRS paper, Fig. 1 and Fig. 10 analogs: empirical attacks on fp32 vs int8 models, base and smoothed.

Fig. 1: PGD-l_inf (7 steps, random start) at eps 0.001-0.05 on the base models: the fp32 model
(white-box) and the int8 model, attacked through its fake-quant (QAT) twin, whose straight-through
gradients the int8 engine lacks (transfer), next to the QAT twin itself (white-box).
Fig. 10: PGD-l2 (20 steps) at eps 0, 0.12, 0.25, 0.5, 1.0 against the smoothed classifiers: FloatRS-fp
(fp32 base) and IntRS-quant (int8 base), each attacked by expectation over Gaussian noise on its float
twin (Salman et al. 2019), then predicted with n noisy samples at alpha = 0.001 (abstentions count as
errors). Adversarial images are rounded to the uint8 lattice before smoothing, as a camera would.

Usage (the committed results/intrs/attacks/, from the sigma = 0.25 models of bench/intrs_table2.sh):
    .venv/bin/python bench/intrs_attacks.py --sigma 0.25 --images 200 --n 1000 --out results/intrs/attacks
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure

from qrobust.attacks import PGD, ExpectationOverNoise, LatticeInputs, robust_accuracy
from qrobust.data import load_dataset, to_unit_interval
from qrobust.progress import progress_bar
from qrobust.quant import fast_backend, load_int8
from qrobust.smoothing import FloatRS, IntRS, SmoothedClassifier, evenly_spaced
from qrobust.smoothing.run import example_generator
from qrobust.train import load_model

FIG1_EPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05)
FIG10_EPS = (0.0, 0.12, 0.25, 0.5, 1.0)


def figure1(fp32, qat, int8, images, labels, seed: int) -> dict[str, list[float]]:
    """Accuracy (%) of each base model under PGD-l_inf at each eps of FIG1_EPS."""
    curves = {"fp32 (white-box)": [], "int8 QAT twin (white-box)": [], "int8 engine (transfer from QAT twin)": []}
    for eps in FIG1_EPS:

        def pgd(model, eps=eps):
            return PGD(
                model,
                norm="inf",
                eps=eps,
                step_size=2.5 * eps / 7,
                steps=7,
                generator=torch.Generator().manual_seed(seed),
            )

        curves["fp32 (white-box)"].append(100 * robust_accuracy(fp32, pgd(fp32), images, labels))
        twin = pgd(qat)
        curves["int8 QAT twin (white-box)"].append(100 * robust_accuracy(qat, twin, images, labels))
        twin = pgd(qat)  # the same random start again, so the int8 model sees the twin's examples
        curves["int8 engine (transfer from QAT twin)"].append(100 * robust_accuracy(int8, twin, images, labels))
        print(f"fig 1, eps {eps}: " + ", ".join(f"{name} {values[-1]:.1f}%" for name, values in curves.items()))
    return curves


def figure10(fp32, qat, int8_fast, images, labels, indices, sigma: float, n: int, seed: int) -> dict[str, list[float]]:
    """Smoothed accuracy (%) of FloatRS-fp and IntRS-quant under EOT PGD-l2 at each eps of FIG10_EPS."""
    smoothed = {
        "FloatRS-fp": (fp32, SmoothedClassifier(fp32, 10, FloatRS(sigma), batch_size=500)),
        "IntRS-quant": (qat, SmoothedClassifier(int8_fast, 10, IntRS(sigma), batch_size=500)),
    }
    curves = {name: [] for name in smoothed}
    with progress_bar() as bar:
        for eps in FIG10_EPS:
            for name, (source, classifier) in smoothed.items():
                task = bar.add_task(f"{name} eps {eps}", total=len(images), status="")
                expectation = ExpectationOverNoise(source, sigma, 16, generator=torch.Generator().manual_seed(seed))
                attack = PGD(
                    expectation,
                    norm="2",
                    eps=eps,
                    step_size=eps / 8,
                    steps=20,
                    generator=torch.Generator().manual_seed(seed),
                )
                correct = 0
                for start in range(0, len(images), 50):
                    x, y = images[start : start + 50], labels[start : start + 50]
                    adversarial = x if eps == 0 else attack(x, y)
                    lattice = (adversarial * 255).round().to(torch.uint8)  # (B, C, H, W)
                    for offset, (image, label) in enumerate(zip(lattice, y, strict=True)):
                        generator = example_generator(seed, indices[start + offset])
                        correct += classifier.predict(image, n=n, alpha=0.001, generator=generator).label == int(label)
                    bar.update(task, advance=len(x), status=f"acc {correct / (start + len(x)):.3f}")
                curves[name].append(100 * correct / len(images))
            print(f"fig 10, eps {eps}: " + ", ".join(f"{name} {values[-1]:.1f}%" for name, values in curves.items()))
    return curves


def save(curves: dict[str, list[float]], eps: tuple[float, ...], title: str, xlabel: str, out: Path, stem: str) -> None:
    """A TSV (eps, one column per curve) and a PNG plot of the curves."""
    lines = ["eps\t" + "\t".join(curves)]
    lines += [f"{e:g}\t" + "\t".join(f"{values[i]:.1f}" for values in curves.values()) for i, e in enumerate(eps)]
    (out / f"{stem}.tsv").write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.subplots()
    for name, values in curves.items():
        axes.plot(eps, values, marker="o", label=name)
    axes.set(title=title, xlabel=xlabel, ylabel="accuracy (%)", ylim=(0, 100))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=120)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/intrs"), help="where bench/intrs_table2.sh wrote the models"
    )
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/intrs/attacks"))
    args = parser.parse_args()
    stem = args.runs / f"{args.model}-{args.sigma}"
    fp32, saved = load_model(f"{stem}.pt")
    qat, _ = load_model(f"{stem}-qat.pt")
    int8 = load_int8(f"{stem}.int8.pt").model
    data = load_dataset(saved.dataset_info.name, "test")
    indices = evenly_spaced(len(data), args.images)
    images, labels = to_unit_interval(data.images[indices]), data.labels[indices]
    args.out.mkdir(parents=True, exist_ok=True)
    curves = figure1(fp32, qat, LatticeInputs(int8), images, labels, args.seed)
    save(
        curves,
        FIG1_EPS,
        f"PGD-l_inf (7 steps) on the base models, sigma {args.sigma} training",
        "l_inf eps ([0, 1] pixel units)",
        args.out,
        "fig1-pgd-linf-base",
    )
    curves = figure10(fp32, qat, fast_backend(int8), images, labels, indices, args.sigma, args.n, args.seed)
    save(
        curves,
        FIG10_EPS,
        f"EOT PGD-l2 (20 steps) on smoothed models, sigma {args.sigma}, n {args.n}",
        "l2 eps ([0, 1] pixel units)",
        args.out,
        "fig10-pgd-l2-smoothed",
    )


if __name__ == "__main__":
    main()
