//! Observation preprocessing (§5.1–5.2): camera images to the policy's normalized CHW tensors.
//!
//! Steps per image: optional 180° rotation (LIBERO renders upside down; off for real cameras),
//! resize to the model's input size only when the image is not already that size (Lanczos3; the
//! reference also round-trips through JPEG, which cannot be matched bit for bit), the 90%-area
//! center crop resized back with TensorFlow's `crop_and_resize` bilinear arithmetic and uint8
//! saturation, and SigLIP's `(u8/255 − 0.5)/0.5` normalization.

use image::RgbImage;

/// Per-camera preprocessing options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOptions {
    /// Rotate by 180° first (LIBERO's simulator cameras).
    pub rotate_180: bool,
    /// The 90%-area center crop the BitVLA fine-tunes were evaluated with (`center_crop = True`).
    pub center_crop: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            rotate_180: false,
            center_crop: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("unsupported image encoding {0:?} (rgb8, bgr8, rgba8, bgra8, mono8)")]
    Encoding(String),
    #[error("image {width}x{height} exceeds the {max}-pixel side limit")]
    TooLarge { width: u32, height: u32, max: u32 },
    #[error("row step {step} is smaller than {width} pixels x {channels} bytes")]
    Step {
        step: usize,
        width: u32,
        channels: usize,
    },
    #[error("image data has {got} bytes, {height} rows of step {step} need {expected}")]
    Truncated {
        got: usize,
        expected: usize,
        height: u32,
        step: usize,
    },
    #[error("cannot decode the compressed image: {0}")]
    Compressed(String),
    #[error("image is empty ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error("image buffer has {got} bytes, {width}x{height} RGB needs {expected}")]
    Size {
        width: u32,
        height: u32,
        expected: usize,
        got: usize,
    },
}

/// Wraps raw RGB8 bytes (row-major, no padding) as an image, checking the size.
pub fn rgb_from_raw(width: u32, height: u32, data: Vec<u8>) -> Result<RgbImage, ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    let expected = width as usize * height as usize * 3;
    let got = data.len();
    RgbImage::from_raw(width, height, data).ok_or(ImageError::Size {
        width,
        height,
        expected,
        got,
    })
}

/// Largest accepted image side: bounds the memory a malformed message can make us allocate.
pub const MAX_SIDE: u32 = 8192;

/// Decodes a raw `sensor_msgs/Image` (rgb8, bgr8, rgba8, bgra8, mono8; rows of `step` bytes,
/// padding ignored) to RGB.
pub fn decode_raw(
    encoding: &str,
    width: u32,
    height: u32,
    step: usize,
    data: &[u8],
) -> Result<RgbImage, ImageError> {
    let (channels, order): (usize, [usize; 3]) = match encoding {
        "rgb8" => (3, [0, 1, 2]),
        "bgr8" => (3, [2, 1, 0]),
        "rgba8" => (4, [0, 1, 2]),
        "bgra8" => (4, [2, 1, 0]),
        "mono8" | "8UC1" => (1, [0, 0, 0]),
        other => return Err(ImageError::Encoding(other.to_owned())),
    };
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(ImageError::TooLarge {
            width,
            height,
            max: MAX_SIDE,
        });
    }
    let row = width as usize * channels;
    if step < row {
        return Err(ImageError::Step {
            step,
            width,
            channels,
        });
    }
    let expected = step * (height as usize - 1) + row;
    if data.len() < expected {
        return Err(ImageError::Truncated {
            got: data.len(),
            expected,
            height,
            step,
        });
    }
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height as usize {
        let src = &data[y * step..y * step + row];
        if encoding == "rgb8" {
            out.extend_from_slice(src);
        } else {
            for px in src.chunks_exact(channels) {
                out.extend(order.iter().map(|&c| px[c]));
            }
        }
    }
    rgb_from_raw(width, height, out)
}

/// Decodes a `sensor_msgs/CompressedImage` (JPEG or PNG) to RGB.
pub fn decode_compressed(data: &[u8]) -> Result<RgbImage, ImageError> {
    let reader = image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| ImageError::Compressed(e.to_string()))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ImageError::Compressed(e.to_string()))?;
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(ImageError::TooLarge {
            width: w,
            height: h,
            max: MAX_SIDE,
        });
    }
    image::load_from_memory(data)
        .map(|i| i.to_rgb8())
        .map_err(|e| ImageError::Compressed(e.to_string()))
}

/// The uint8 image the vision tower sees (after rotation, resize and crop), `size`×`size`.
pub fn prepare_u8(img: &RgbImage, size: u32, opts: ImageOptions) -> Result<RgbImage, ImageError> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(ImageError::Empty {
            width: w,
            height: h,
        });
    }
    let rotated;
    let mut img = img;
    if opts.rotate_180 {
        rotated = image::imageops::rotate180(img);
        img = &rotated;
    }
    let resized;
    if img.dimensions() != (size, size) {
        resized = image::imageops::resize(img, size, size, image::imageops::FilterType::Lanczos3);
        img = &resized;
    }
    Ok(if opts.center_crop {
        center_crop(img, size)
    } else {
        img.clone()
    })
}

/// The 90%-area center crop, resized back to `size` (§5.1 step 3): `tf.image.crop_and_resize`
/// (bilinear, on the [0, 1] float image) then `convert_image_dtype` back to uint8
/// (`trunc(clamp(v · 255.5, 0, 255))`).
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = 0.9f32.sqrt();
    let lo = (1.0 - scale) / 2.0;
    let hi = (1.0 + scale) / 2.0;
    let coords = |extent: u32| -> Vec<(usize, usize, f32)> {
        let span = (extent - 1) as f32;
        (0..size)
            .map(|i| {
                let v = if size > 1 {
                    lo * span + i as f32 * ((hi - lo) * span / (size - 1) as f32)
                } else {
                    0.5 * (lo + hi) * span
                };
                let top = v.floor();
                let bottom = v.ceil();
                (
                    top as usize,
                    (bottom as usize).min(extent as usize - 1),
                    v - top,
                )
            })
            .collect()
    };
    let ys = coords(h);
    let xs = coords(w);
    let inv = 1.0f32 / 255.0;
    let px =
        |x: usize, y: usize, c: usize| f32::from(img.as_raw()[(y * w as usize + x) * 3 + c]) * inv;
    let mut out = RgbImage::new(size, size);
    for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
            for c in 0..3 {
                let tl = px(x0, y0, c);
                let tr = px(x1, y0, c);
                let bl = px(x0, y1, c);
                let br = px(x1, y1, c);
                let top = tl + (tr - tl) * fx;
                let bottom = bl + (br - bl) * fx;
                let v = top + (bottom - top) * fy;
                out.as_mut()[(oy * size as usize + ox) * 3 + c] =
                    (v * 255.5).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// SigLIP normalization to a CHW f32 tensor in [−1, 1].
pub fn to_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(p[c]) * (1.0 / 255.0) - 0.5) / 0.5;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_coordinates_match_the_spec() {
        // A horizontal ramp: output column i samples x = 5.7218 + 0.9486833·i (§5.1).
        let img = RgbImage::from_fn(224, 224, |x, _| image::Rgb([x as u8, 0, 0]));
        let out = center_crop(&img, 224);
        for i in [0u32, 100, 223] {
            let x = 5.7218 + 0.948_683_3 * i as f32;
            let expected = ((x / 255.0) * 255.5).clamp(0.0, 255.0) as u8;
            assert!(
                (i32::from(out.get_pixel(i, 7)[0]) - i32::from(expected)).abs() <= 1,
                "column {i}"
            );
        }
    }

    #[test]
    fn ros_encodings_and_padding() {
        // 2x2, bgra8 with 4 bytes of row padding.
        let data = [
            1, 2, 3, 255, 4, 5, 6, 255, 0, 0, 0, 0, //
            7, 8, 9, 255, 10, 11, 12, 255, 0, 0, 0, 0,
        ];
        let img = decode_raw("bgra8", 2, 2, 12, &data).unwrap();
        assert_eq!(img.as_raw(), &[3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]);
        let mono = decode_raw("mono8", 2, 1, 2, &[5, 9]).unwrap();
        assert_eq!(mono.as_raw(), &[5, 5, 5, 9, 9, 9]);
        assert!(matches!(
            decode_raw("yuv422", 2, 2, 4, &data),
            Err(ImageError::Encoding(_))
        ));
        assert!(matches!(
            decode_raw("rgb8", 2, 2, 5, &data),
            Err(ImageError::Step { .. })
        ));
        assert!(matches!(
            decode_raw("rgb8", 2, 2, 6, &data[..8]),
            Err(ImageError::Truncated { .. })
        ));
        assert!(matches!(
            decode_raw("rgb8", 100_000, 2, 300_000, &data),
            Err(ImageError::TooLarge { .. })
        ));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(decode_compressed(&png).unwrap(), img);
        assert!(matches!(
            decode_compressed(&png[..20]),
            Err(ImageError::Compressed(_))
        ));
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(matches!(
            rgb_from_raw(4, 4, vec![0; 47]),
            Err(ImageError::Size { .. })
        ));
        assert!(matches!(
            rgb_from_raw(0, 4, vec![]),
            Err(ImageError::Empty { .. })
        ));
        let img = rgb_from_raw(300, 200, vec![128; 300 * 200 * 3]).unwrap();
        let out = prepare_u8(&img, 224, ImageOptions::default()).unwrap();
        assert_eq!(out.dimensions(), (224, 224));
        assert!(to_chw(&out).iter().all(|v| (v - 0.003_921_6).abs() < 0.01));
    }
}
