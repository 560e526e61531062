//! Checkpoint and observation variants the shapes and config decide: one camera, a
//! full-precision vision tower (`vit_weight_bits` absent), other chunk lengths.

use bitvla_ros::model::tiny::{ScratchModel, TinyShape};
use bitvla_ros::model::{Observation, Policy, PolicyOptions};

fn model(tag: &str) -> ScratchModel {
    ScratchModel::new(&format!("variant-{tag}"), 5, TinyShape::default()).unwrap()
}

fn observation(images: usize) -> Observation {
    let img = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([(x * 3) as u8, y as u8, 90]));
    Observation {
        images: vec![img; images],
        instruction: "open the top drawer".into(),
        proprio: Some(vec![0.1; 8]),
    }
}

#[test]
fn one_camera_uses_one_image_block() {
    let dir = model("single");
    let policy = Policy::load(&dir, PolicyOptions::default()).unwrap();
    let two = policy.predict(&observation(2)).unwrap();
    let one = policy.predict(&observation(1)).unwrap();
    assert_eq!(two.tokens - one.tokens, 256);
    assert!(one.actions.iter().all(|v| v.is_finite()));
    assert_ne!(one.normalized, two.normalized);
}

#[test]
fn full_precision_vision_tower() {
    let dir = model("vit-bf16");
    let ternary = Policy::load(&dir, PolicyOptions::default())
        .unwrap()
        .predict(&observation(2))
        .unwrap();
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vision = config["vision_config"].as_object_mut().unwrap();
    vision.remove("vit_weight_bits");
    vision.remove("vit_act_bits");
    std::fs::write(&path, config.to_string()).unwrap();
    let policy = Policy::load(&dir, PolicyOptions::default()).unwrap();
    let full = policy.predict(&observation(2)).unwrap();
    assert!(full.actions.iter().all(|v| v.is_finite()));
    assert_ne!(full.normalized, ternary.normalized);
    // The packed file keeps the vision tower in full precision too.
    let packed = dir.join("tiny.bitvla");
    bitvla_ros::model::packed::convert(&dir, &packed).unwrap();
    let again = Policy::load(&packed, PolicyOptions::default())
        .unwrap()
        .predict(&observation(2))
        .unwrap();
    assert_eq!(again.normalized, full.normalized);
}

#[test]
fn chunk_length_comes_from_the_options() {
    let dir = model("horizon");
    let eight = Policy::load(&dir, PolicyOptions::default())
        .unwrap()
        .predict(&observation(2))
        .unwrap();
    let options = PolicyOptions {
        horizon: Some(4),
        ..Default::default()
    };
    let four = Policy::load(&dir, options)
        .unwrap()
        .predict(&observation(2))
        .unwrap();
    assert_eq!(
        (four.horizon, four.action_dim, four.actions.len()),
        (4, 7, 28)
    );
    assert_eq!(eight.tokens - four.tokens, 4 * 7);
}

#[test]
fn kept_buffers_change_nothing_between_calls_of_other_sizes() {
    // A policy keeps its activation buffers from call to call; calls of other sizes (one or two
    // images, longer instructions) in between must leave no trace in the next results.
    let dir = model("buffers");
    let fresh = |obs: &Observation| {
        Policy::load(&dir, PolicyOptions::default())
            .unwrap()
            .predict(obs)
            .unwrap()
    };
    let one = observation(1);
    let mut two = observation(2);
    two.instruction = "put the black bowl on the plate and then close the top drawer".into();
    let policy = Policy::load(&dir, PolicyOptions::default()).unwrap();
    let calls: Vec<_> = [&one, &two, &one, &two]
        .iter()
        .map(|obs| policy.predict(obs).unwrap())
        .collect();
    let (fresh_one, fresh_two) = (fresh(&one), fresh(&two));
    for (i, call) in calls.iter().enumerate() {
        let expect = if i % 2 == 0 { &fresh_one } else { &fresh_two };
        assert_eq!(call.normalized, expect.normalized, "call {i}");
        assert_eq!(call.actions, expect.actions, "call {i}");
    }
}
