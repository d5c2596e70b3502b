"""Train a student on a distilled-set package, labelled online by its projector.

    python examples/train_on_package.py s3://bucket/packages/digits-ipc2 --epochs 300 --device cuda

Only ``hello_ray.distilled`` and plain PyTorch/torchvision: no Ray, no store of the run that made the
package. The loss is evaluate's ``kl`` (KL at temperature T, times T^2) on CutMix'd random crops.
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import hello_ray.distilled


def train(uri, epochs=300, batch_size=100, lr=1e-3, temperature=20.0, device="cpu", student=None):
    pkg = hello_ray.distilled.open(uri)                   # every file checked against the manifest
    labeller = pkg.labeller("projector", device=device)   # frozen: images in [0, 1] -> logits [B, C]
    classes = len(pkg.class_names)
    student = (student or torchvision.models.resnet18(num_classes=classes)).to(device)
    normalise = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # the student's input scaling
    crop = v2.Compose([v2.RandomResizedCrop(pkg.image_size, scale=(0.08, 1.0)), v2.RandomHorizontalFlip()])
    cutmix = v2.CutMix(alpha=1.0, num_classes=classes)
    loader = torch.utils.data.DataLoader(pkg.torch_dataset(transform=crop), batch_size=batch_size, shuffle=True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            x, _ = cutmix(x.to(device), y.to(device))    # the labeller labels the mixed image itself
            target = labeller(x)                         # [B, C] soft labels, made online
            out = student(normalise(x))
            t = temperature
            loss = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(target / t, 1),
                            reduction="batchmean", log_target=True) * t * t
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return student, loss.item()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="train a student on a hello_ray distilled-set package")
    ap.add_argument("package", help="local folder or s3://bucket/prefix/name")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    train(args.package, args.epochs, args.batch_size, device=args.device)
