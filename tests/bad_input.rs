//! Broken checkpoints and bad observations: each is a clear error naming the file, tensor, field
//! or input at fault, never a panic, and the policy keeps serving afterwards.

use bitvla_ros::model::tiny::{ScratchModel, TinyShape};
use bitvla_ros::model::{Observation, Policy, PolicyOptions};
use std::path::{Path, PathBuf};

struct Scratch(ScratchModel);

impl Scratch {
    fn new(tag: &str) -> Self {
        Self(ScratchModel::new(&format!("bad-{tag}"), 3, TinyShape::default()).unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

fn load_err(path: &Path) -> String {
    match Policy::load(path, PolicyOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} does not mention {p:?}");
    }
}

/// Overwrites the first bytes of tensor `name`'s data in a safetensors file.
fn patch_tensor(file: &Path, name: &str, bytes: &[u8]) {
    let mut data = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    data[8 + n + start..8 + n + start + bytes.len()].copy_from_slice(bytes);
    std::fs::write(file, data).unwrap();
}

fn observation() -> Observation {
    let img = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 7]));
    Observation {
        images: vec![img.clone(), img],
        instruction: "pick up the bowl".into(),
        proprio: Some(vec![0.0; 8]),
    }
}

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

#[test]
fn missing_and_extra_files() {
    let s = Scratch::new("files");
    std::fs::remove_file(s.path("dataset_statistics.json")).unwrap();
    assert_mentions(&load_err(&s.0), &["dataset_statistics.json", "missing"]);

    let s = Scratch::new("head");
    std::fs::remove_file(s.path("action_head--10000_checkpoint.pt")).unwrap();
    assert_mentions(&load_err(&s.0), &["action_head--*_checkpoint.pt"]);

    let s = Scratch::new("twoheads");
    std::fs::copy(
        s.path("action_head--10000_checkpoint.pt"),
        s.path("action_head--20000_checkpoint.pt"),
    )
    .unwrap();
    assert_mentions(&load_err(&s.0), &["several action_head"]);

    let s = Scratch::new("shard");
    std::fs::remove_file(s.path(SHARD2)).unwrap();
    assert_mentions(&load_err(&s.0), &[SHARD2, "missing"]);

    assert_mentions(
        &load_err(Path::new("/nonexistent/model")),
        &["/nonexistent/model"],
    );
}

#[test]
fn broken_tokenizer() {
    // Parsed on a thread of its own while the weights load: its errors still name the file.
    let s = Scratch::new("tokenizer-json");
    let path = s.path("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert_mentions(
        &load_err(&s.0),
        &["tokenizer.json", "cannot load the tokenizer"],
    );

    let s = Scratch::new("tokenizer-ids");
    let path = s.path("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("<|image_pad|>"));
    std::fs::write(&path, text.replace("<|image_pad|>", "<|image_pad_x|>")).unwrap();
    assert_mentions(&load_err(&s.0), &["tokenizer.json", "<|image_pad|>"]);

    // Together with a broken weight: one error, no panic.
    let s = Scratch::new("tokenizer-and-shard");
    std::fs::write(s.path("tokenizer.json"), "{").unwrap();
    std::fs::write(s.path(SHARD2), b"not a safetensors file").unwrap();
    let err = load_err(&s.0);
    assert!(!err.is_empty());
}

#[test]
fn config_with_wrong_types_or_shapes() {
    let s = Scratch::new("config");
    let path = s.path("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["text_config"]["hidden_size"] = "wide".into();
    std::fs::write(&path, config.to_string()).unwrap();
    assert_mentions(&load_err(&s.0), &["config.json", "text_config.hidden_size"]);

    // A config that disagrees with the tensors: the tensor is named with both shapes.
    config["text_config"]["hidden_size"] = 96.into();
    std::fs::write(&path, config.to_string()).unwrap();
    assert_mentions(
        &load_err(&s.0),
        &[
            "multi_modal_projector.linear_1.weight",
            "shape [128, 64]",
            "expected [96, 64]",
        ],
    );
}

#[test]
fn truncated_files() {
    let s = Scratch::new("trunc");
    let shard = s.path(SHARD2);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 3]).unwrap();
    assert_mentions(&load_err(&s.0), &[SHARD2, "truncated"]);

    let s = Scratch::new("truncpt");
    let pt = s.path("proprio_projector--10000_checkpoint.pt");
    let bytes = std::fs::read(&pt).unwrap();
    std::fs::write(&pt, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(&load_err(&s.0), &["proprio_projector--10000_checkpoint.pt"]);
}

#[test]
fn non_finite_weights() {
    let s = Scratch::new("nan");
    let name = "language_model.model.layers.1.mlp.down_proj.weight";
    patch_tensor(&s.path(SHARD2), name, &half::bf16::NAN.to_le_bytes());
    assert_mentions(&load_err(&s.0), &[name, "non-finite"]);
}

#[test]
fn corrupt_packed_codes() {
    let s = Scratch::new("packed");
    let packed = s.path("tiny.bitvla");
    bitvla_ros::model::packed::convert(&s.0, &packed).unwrap();
    let name = "language_model.model.layers.0.self_attn.q_proj.weight.codes";
    patch_tensor(&packed, name, &[0xff]);
    assert_mentions(&load_err(&packed), &[name, "invalid code 3"]);
    // Not a packed file at all.
    assert_mentions(&load_err(&s.path(SHARD1)), &[SHARD1, "bitvla convert"]);
}

#[test]
fn bad_observations_are_errors_and_the_policy_keeps_serving() {
    let s = Scratch::new("obs");
    let policy = Policy::load(&s.0, PolicyOptions::default()).unwrap();
    let good = observation();
    let reference = policy.predict(&good).unwrap();
    let cases: Vec<(&str, Observation)> = vec![
        (
            "instruction is empty",
            Observation {
                instruction: "  ".into(),
                ..good.clone()
            },
        ),
        (
            "proprio vector has 7 values",
            Observation {
                proprio: Some(vec![0.0; 7]),
                ..good.clone()
            },
        ),
        (
            "proprio[2] is NaN",
            Observation {
                proprio: Some(vec![0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0]),
                ..good.clone()
            },
        ),
        (
            "none was given",
            Observation {
                proprio: None,
                ..good.clone()
            },
        ),
        (
            "3 images",
            Observation {
                images: vec![good.images[0].clone(); 3],
                ..good.clone()
            },
        ),
        (
            "image 1",
            Observation {
                images: vec![good.images[0].clone(), image::RgbImage::new(0, 0)],
                ..good.clone()
            },
        ),
        (
            "placeholder",
            Observation {
                instruction: "pick <|image_pad|> up".into(),
                ..good.clone()
            },
        ),
    ];
    for (expected, obs) in cases {
        let err = policy.predict(&obs).unwrap_err().to_string();
        assert_mentions(&err, &[expected]);
        assert_eq!(policy.predict(&good).unwrap().actions, reference.actions);
    }
    // Other image sizes are resized, not rejected.
    let small = image::RgbImage::from_fn(100, 80, |x, y| image::Rgb([x as u8, y as u8, 0]));
    let obs = Observation {
        images: vec![small.clone(), small],
        ..good.clone()
    };
    assert!(policy.predict(&obs).is_ok());
}

#[test]
fn unknown_unnormalization_key() {
    let s = Scratch::new("key");
    let options = PolicyOptions {
        unnorm_key: Some("libero_99".into()),
        ..Default::default()
    };
    let err = match Policy::load(&s.0, options) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert_mentions(&err, &["libero_99", "libero_spatial_no_noops"]);
}

#[test]
fn overflowing_activations_are_reported_not_published() {
    let s = Scratch::new("overflow");
    // A finite but enormous norm weight makes the first layer's activations overflow to ∞.
    let name = "language_model.model.layers.0.input_layernorm.weight";
    let huge: Vec<u8> = (0..128)
        .flat_map(|_| half::bf16::from_f32(3e38).to_le_bytes())
        .collect();
    patch_tensor(&s.path(SHARD2), name, &huge);
    let policy = Policy::load(&s.0, PolicyOptions::default()).unwrap();
    let err = policy.predict(&observation()).unwrap_err().to_string();
    assert_mentions(&err, &["non-finite"]);
}
