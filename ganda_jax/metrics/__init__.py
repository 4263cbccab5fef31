"""Evaluation: accuracy, mIoU, PSNR, image conversions, batched evaluation on a mesh."""
