"""The ImageNet command: ResNet-18/50 circuits under each feedback rule (the paper's Table 1).

    python examples/imagenet.py                   # print the commands
    python examples/imagenet.py --smoke           # run them at toy size on a synthetic image folder

ImageNet is not downloaded by anything here: point --data at a folder with train/ and val/
subfolders of class folders of JPEGs (the usual ILSVRC-2012 layout). The training itself lives in
models/imagenet.py (its --help lists every flag); this script shows how to call it.
"""
import argparse
import tempfile

ARCHS, RULES = ("resnet18", "resnet50"), ("bp", "fa", "ss", "kp", "wm")


def commands(data: str) -> list[str]:
    """One run per architecture and rule: one GPU, or 8 GPUs of one machine with torchrun."""
    lines = []
    for arch in ARCHS:
        for rule in RULES:
            lines.append(f"torchrun --nproc_per_node=8 -m models.imagenet --data {data} --arch {arch} --rule {rule}")
    lines.append(f"python -m models.imagenet --data {data} --arch resnet18 --rule kp      # one GPU")
    lines.append("python -m analysis report runs/imagenet-*/run.h5 -o runs/imagenet-report")
    return lines


def smoke() -> None:
    """Every rule for one epoch of a ResNet-8 on 16 x 16 crops of a synthetic ImageNet-layout folder."""
    from models import imagenet
    from models.imagenet_data import synthetic_image_folder

    with tempfile.TemporaryDirectory(prefix="imagenet-") as tmp:
        folder = synthetic_image_folder(f"{tmp}/data", classes=3, train_per_class=4, val_per_class=2, size=(24, 32))
        for rule in RULES:
            trainer = imagenet.main(["--data", str(folder), "--arch", "resnet8", "--rule", rule, "--epochs", "1",
                                     "--image-size", "16", "--batch-size", "4", "--workers", "0",
                                     "--out", f"{tmp}/{rule}", "--no-progress"])
            print(f"{rule}: {trainer.progress.step} learning steps done")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/datasets/imagenet", help="ImageNet folder (train/ and val/)")
    p.add_argument("--smoke", action="store_true", help="run every rule at toy size on synthetic images")
    args = p.parse_args(argv)
    print("\n".join(commands(args.data)))
    if args.smoke:
        smoke()


if __name__ == "__main__":
    main()
