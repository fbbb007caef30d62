//! Llama 3 chat prompt format, as Meta's `ChatFormat` (text messages only).

use serde::{Deserialize, Serialize};

use super::bpe::is_py_space;
use super::{Tokenizer, TokenizerError};

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
    /// Tool output; Meta's role "tool", written "ipython" in the header.
    #[serde(alias = "tool")]
    Ipython,
}

impl Role {
    /// Parses a role name: `system`, `user`, `assistant`, `ipython` or `tool`
    /// (an alias of `ipython`, as in Meta's format).
    pub fn parse(name: &str) -> Result<Role, TokenizerError> {
        match name {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "ipython" | "tool" => Ok(Role::Ipython),
            other => Err(TokenizerError::UnknownRole(other.to_string())),
        }
    }

    /// The name written in the message header.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Ipython => "ipython",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = TokenizerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chat message, deserializable from `{"role": "user", "content": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A message from `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

impl Tokenizer {
    /// `<|start_header_id|>role<|end_header_id|>\n\n`.
    pub fn encode_header(&self, role: Role) -> Vec<u32> {
        let mut ids = vec![self.start_header_id];
        ids.extend(self.encode(role.as_str(), false, false));
        ids.push(self.end_header_id);
        ids.extend(self.encode("\n\n", false, false));
        ids
    }

    /// One message without BOS: header, content with surrounding whitespace removed
    /// (Python's `str.strip()`), then `<|eot_id|>`.
    ///
    /// The strip follows Meta's original llama3 `ChatFormat` and the HF chat template;
    /// `llama_models` 0.3 encodes content unstripped, so the two agree exactly when
    /// content has no leading or trailing whitespace.
    pub fn encode_message(&self, message: &Message) -> Vec<u32> {
        let mut ids = self.encode_header(message.role);
        ids.extend(self.encode(message.content.trim_matches(is_py_space), false, false));
        ids.push(self.eot_id);
        ids
    }

    /// A full prompt: BOS, every message, then an open assistant header for the reply.
    pub fn encode_dialog(&self, messages: &[Message]) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        for m in messages {
            ids.extend(self.encode_message(m));
        }
        ids.extend(self.encode_header(Role::Assistant));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_parse() {
        assert_eq!(Role::parse("tool").ok(), Some(Role::Ipython));
        assert_eq!(Role::parse("assistant").ok(), Some(Role::Assistant));
        let err = Role::parse("wizard").map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("wizard"), "{err}");
    }

    #[test]
    fn message_json() {
        let m: Message =
            serde_json::from_str(r#"{"role":"tool","content":"42"}"#).expect("valid message");
        assert_eq!(m, Message::new(Role::Ipython, "42"));
        let err = serde_json::from_str::<Message>(r#"{"role":"wizard","content":""}"#)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("wizard"), "{err}");
    }
}
