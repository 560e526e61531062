//! The prompt (§4): the chat-template string rendered exactly as the reference renders it, the
//! shipped `tokenizer.json` run through the `tokenizers` crate with special tokens enabled, then
//! the action slots and the stop token (§5.3).

use super::{ModelError, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// `<|image_pad|>` (`BITNET_DEFAULT_IMAGE_TOKEN_IDX`).
pub const IMAGE_PAD_ID: u32 = 128010;
/// `<proprio_pad>` (`BITNET_PROPRIO_PAD_IDX`).
pub const PROPRIO_PAD_ID: u32 = 128011;
/// `<|end_of_text|>` (`BITNET_STOP_INDEX`), appended after the action slots.
pub const STOP_ID: u32 = 128001;
/// Input id of the action slots; their embeddings are zeroed, so the value is arbitrary.
pub const ACTION_SLOT_ID: u32 = 1;

const SYSTEM: &str = "System: A chat between a curious human and an artificial intelligence \
assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// Token ids of one policy call.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// P: tokens before the action slots.
    pub prompt_len: usize,
    /// Number of action slots (horizon × action dim).
    pub action_slots: usize,
}

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
}

impl PromptTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        Self::from_json(&text, path)
    }

    /// From the contents of a `tokenizer.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let path = origin;
        let tokenizer: Tokenizer = text
            .parse()
            .map_err(|e| ModelError::file(path, format!("cannot load the tokenizer: {e}")))?;
        for (token, id) in [
            ("<|image_pad|>", IMAGE_PAD_ID),
            ("<proprio_pad>", PROPRIO_PAD_ID),
            ("<|end_of_text|>", STOP_ID),
        ] {
            let got = tokenizer.token_to_id(token);
            if got != Some(id) {
                return Err(ModelError::file(
                    path,
                    format!("token {token} has id {got:?}; BitVLA checkpoints use {id}"),
                ));
            }
        }
        Ok(Self { tokenizer })
    }

    /// The rendered chat prompt (§4.2) with each image placeholder expanded to `patches` copies.
    pub fn render(
        instruction: &str,
        images: usize,
        patches: usize,
        proprio: bool,
    ) -> Result<String> {
        let task = instruction.trim().to_lowercase();
        if task.is_empty() {
            return Err(ModelError::Input("the instruction is empty".into()));
        }
        let mut user = "<|image_pad|>".repeat(images * patches);
        if proprio {
            user.push_str("<proprio_pad>");
        }
        user.push_str(&format!("What action should the robot take to {task}?"));
        Ok(format!(
            "{SYSTEM}<|eot_id|>User: {}<|eot_id|>Assistant: ",
            user.trim()
        ))
    }

    /// Prompt ids followed by `action_slots` slot ids and the stop id.
    pub fn encode(
        &self,
        instruction: &str,
        images: usize,
        patches: usize,
        proprio: bool,
        action_slots: usize,
    ) -> Result<Prompt> {
        let text = Self::render(instruction, images, patches, proprio)?;
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Input(format!("tokenizer: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        let count = |id| ids.iter().filter(|&&t| t == id).count();
        let (img, prop) = (count(IMAGE_PAD_ID), count(PROPRIO_PAD_ID));
        if img != images * patches || prop != usize::from(proprio) {
            return Err(ModelError::Input(format!(
                "the instruction produced {img} image and {prop} proprio placeholder tokens \
                 (expected {} and {}); does it contain special tokens?",
                images * patches,
                usize::from(proprio)
            )));
        }
        let prompt_len = ids.len();
        ids.extend(std::iter::repeat_n(ACTION_SLOT_ID, action_slots));
        ids.push(STOP_ID);
        Ok(Prompt {
            ids,
            prompt_len,
            action_slots,
        })
    }
}
