"""Image-quality metrics with named conventions."""

from srquant.metrics.psnr_ssim import CONVENTIONS, psnr_y, ssim_y

__all__ = ["CONVENTIONS", "psnr_y", "ssim_y"]
