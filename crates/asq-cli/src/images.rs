//! A folder of PNG/JPEG images as a dataset (for calibration on a user's own images), via the
//! `image` crate: every `.png`, `.jpg`, `.jpeg` file of the folder in name order, converted to
//! the model's channels (luma for 1, RGB for 3), the shorter side resized to the model's size
//! (bilinear) and the centre cropped, as torchvision's `Resize` + `CenterCrop` do.

use std::path::Path;

use asq_train::data::Dataset;
use image::imageops::{self, FilterType};

use crate::common::Error;

/// Most files read from one folder.
pub const MAX_FILES: usize = 100_000;

/// The images of `dir` as `c x h x w` pixels (labels 0: unlabelled).
pub fn load_folder(dir: &Path, (c, h, w): (usize, usize, usize)) -> Result<Dataset, Error> {
    if c != 1 && c != 3 {
        return Err(format!("image folders feed 1- or 3-channel models, this one has {c}").into());
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no .png, .jpg or .jpeg files", dir.display()).into());
    }
    files.truncate(MAX_FILES);
    let mut images = Vec::with_capacity(files.len() * c * h * w);
    for f in &files {
        let img = image::open(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        if iw == 0 || ih == 0 {
            return Err(format!("{}: empty image", f.display()).into());
        }
        // Shorter side to the target's, keeping the aspect ratio, then the centre crop.
        let scale = (h as f64 / ih as f64).max(w as f64 / iw as f64);
        let (rw, rh) = (
            ((iw as f64 * scale).round() as u32).max(w as u32),
            ((ih as f64 * scale).round() as u32).max(h as u32),
        );
        let resized = img.resize_exact(rw, rh, FilterType::Triangle);
        let (x0, y0) = ((rw - w as u32) / 2, (rh - h as u32) / 2);
        let crop = imageops::crop_imm(&resized, x0, y0, w as u32, h as u32).to_image();
        let crop = image::DynamicImage::ImageRgba8(crop);
        if c == 1 {
            images.extend_from_slice(crop.to_luma8().as_raw());
        } else {
            let rgb = crop.to_rgb8();
            // Interleaved RGB -> planes (NCHW).
            for ch in 0..3 {
                images.extend(rgb.as_raw().iter().skip(ch).step_by(3));
            }
        }
    }
    Ok(Dataset {
        labels: vec![0; files.len()],
        images,
        c,
        h,
        w,
        classes: 1,
    })
}
