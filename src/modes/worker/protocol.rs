//! The AIME API Server's worker protocol (server 0.9.x): JSON bodies over HTTP POST, and a
//! blocking client for them.
//!
//! Routes: `/worker_check_server_status`, `/worker_login`, `/worker_job_request` (a long poll),
//! `/worker_job_progress` (a list of progress records) and `/worker_job_result`.

use std::time::Duration;

use serde_json::{json, Value};

/// llama3_chat's job type.
pub const DEFAULT_JOB_TYPE: &str = "llama3";
/// llama3_chat's published worker key (the server's llama3 endpoint config uses it by default).
pub const DEFAULT_AUTH_KEY: &str = "5b07e305b50505ca2b3284b4ae5f65d1";
/// The server's long-poll length when its login reply does not say.
pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 60.0;

/// What the worker tells the server about its model (`model_parameters` of the login, and the
/// `model_*` keys of every job request).
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub label: String,
    pub quantization: String,
    /// "8B", "70B", ...
    pub size: String,
    pub family: String,
    pub kind: String,
    pub repo_name: String,
}

/// Who the worker is: the keys every request carries.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The worker's name (`auth`): "{hostname}#{replica}_{num_gpus}x{gpu_name}".
    pub auth: String,
    pub job_type: String,
    pub auth_key: String,
    pub gpu_name: String,
    pub num_gpus: usize,
    pub max_batch_size: usize,
    pub model: ModelInfo,
}

/// The worker name the server shows: spaces become underscores (the server's lists split on them).
pub fn worker_name(host: &str, replica: usize, num_gpus: usize, gpu_name: &str) -> String {
    format!("{host}#{replica}_{num_gpus}x{gpu_name}").replace(' ', "_")
}

/// A request that did not get a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No HTTP answer at all: refused, reset, timed out, DNS. Worth retrying.
    #[error("cannot reach the API server at {url}: {msg}")]
    Unreachable { url: String, msg: String },
    /// An HTTP answer other than 200.
    #[error("the API server at {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// HTTP 200 with a body that is not the JSON we expect.
    #[error("the API server at {url} sent an unreadable reply: {msg}")]
    BadReply { url: String, msg: String },
}

impl ApiError {
    /// True when the server could not be reached (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Unreachable { .. })
    }
}

/// The answer to a login or a status check.
#[derive(Clone, Debug, PartialEq)]
pub enum LoginReply {
    /// Logged in; the server long-polls job requests for `request_timeout`.
    Accepted {
        request_timeout: Duration,
        server_version: String,
    },
    /// Wrong key or job type: the server's own words.
    Refused(String),
}

/// The answer to a job request.
#[derive(Clone, Debug, PartialEq)]
pub enum JobReply {
    /// 1..max_job_batch job records (raw: each is validated on its own, see `job.rs`).
    Jobs(Vec<Value>),
    NoJob,
    Error(String),
    Warning(String),
}

/// The answer to a result.
#[derive(Clone, Debug, PartialEq)]
pub enum ResultReply {
    Ok,
    /// The job is unknown to the server or lapsed: nothing to do but log it.
    Warning(String),
}

/// One progress record of `/worker_job_progress`.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub job_id: String,
    /// Cumulative text so far.
    pub text: String,
    pub num_generated_tokens: usize,
    pub current_context_length: usize,
}

/// A job's final answer for `/worker_job_result`.
#[derive(Clone, Debug, PartialEq)]
pub struct JobResult {
    pub job_id: String,
    pub text: String,
    pub num_generated_tokens: usize,
    pub prompt_length: usize,
    pub max_seq_len: usize,
    /// Set on failure (the job alone failed).
    pub error: Option<String>,
}

/// Blocking client of one API server. Every request opens a fresh connection: the server closes
/// idle keep-alive connections after 10 s, and a result POST that went out on a just-closed pooled
/// connection could not be retried safely (a second result for a job makes the server answer 500).
pub struct Client {
    agent: ureq::Agent,
    base: String,
    id: Identity,
}

/// Timeout of the short requests (status, login, progress, result).
const SHORT_TIMEOUT: Duration = Duration::from_secs(30);
/// The client waits this much longer than the server's long poll before giving up on it.
const POLL_MARGIN: Duration = Duration::from_secs(15);

impl Client {
    pub fn new(base_url: &str, id: Identity) -> Client {
        let agent = ureq::AgentBuilder::new()
            .max_idle_connections(0)
            .timeout_connect(Duration::from_secs(10))
            .build();
        Client {
            agent,
            base: base_url.trim_end_matches('/').to_string(),
            id,
        }
    }

    /// The server's base URL as given.
    pub fn url(&self) -> &str {
        &self.base
    }
    pub fn identity(&self) -> &Identity {
        &self.id
    }

    fn post(&self, route: &str, body: &Value, timeout: Duration) -> Result<Value, ApiError> {
        let url = format!("{}/{route}", self.base);
        match self.agent.post(&url).timeout(timeout).send_json(body) {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| ApiError::Unreachable {
                    url: url.clone(),
                    msg: format!("reading the reply: {e}"),
                })?;
                serde_json::from_str(&text).map_err(|e| ApiError::BadReply {
                    url,
                    msg: format!("{e}: {}", clip(&text)),
                })
            }
            Err(ureq::Error::Status(status, resp)) => Err(ApiError::Status {
                url,
                status,
                body: clip(&resp.into_string().unwrap_or_default()),
            }),
            // Transport's Display repeats the URL; kind and message are enough.
            Err(ureq::Error::Transport(t)) => Err(ApiError::Unreachable {
                url,
                msg: match t.message() {
                    Some(m) => format!("{}: {m}", t.kind()),
                    None => t.kind().to_string(),
                },
            }),
        }
    }

    fn auth_keys(&self) -> Value {
        json!({
            "auth": self.id.auth,
            "job_type": self.id.job_type,
            "auth_key": self.id.auth_key,
        })
    }

    /// `/worker_check_server_status`: reachable and willing (HTTP 200 without `cmd: error`).
    pub fn check_status(&self) -> Result<LoginReply, ApiError> {
        let v = self.post(
            "worker_check_server_status",
            &self.auth_keys(),
            SHORT_TIMEOUT,
        )?;
        if cmd(&v) == Some("error") {
            return Ok(LoginReply::Refused(message(&v)));
        }
        Ok(LoginReply::Accepted {
            request_timeout: Duration::from_secs_f64(DEFAULT_REQUEST_TIMEOUT_S),
            server_version: String::new(),
        })
    }

    /// `/worker_login` with the worker's and the model's parameters.
    pub fn login(&self) -> Result<LoginReply, ApiError> {
        let id = &self.id;
        let m = &id.model;
        let body = json!({
            "worker_parameters": {
                "auth": id.auth,
                "job_type": id.job_type,
                "auth_key": id.auth_key,
                "interface_version": interface_version(),
                "version": interface_version(),
                "gpu_name": id.gpu_name,
                "num_gpus": id.num_gpus,
                "framework": "herd",
                "framework_version": env!("CARGO_PKG_VERSION"),
                "max_batch_size": id.max_batch_size,
            },
            "model_parameters": {
                "label": m.label,
                "quantization": m.quantization,
                "size": m.size,
                "family": m.family,
                "type": m.kind,
                "repo_name": m.repo_name,
            },
        });
        let v = self.post("worker_login", &body, SHORT_TIMEOUT)?;
        if v.get("success").and_then(Value::as_bool) == Some(true) {
            let secs = v
                .get("request_timeout")
                .and_then(Value::as_f64)
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT_S);
            let server_version = match v.get("api_server_version") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            return Ok(LoginReply::Accepted {
                request_timeout: Duration::from_secs_f64(secs),
                server_version,
            });
        }
        Ok(LoginReply::Refused(message(&v)))
    }

    /// `/worker_job_request`: up to `max_job_batch` jobs, waiting up to `request_timeout` for one.
    pub fn job_request(
        &self,
        max_job_batch: usize,
        request_timeout: Duration,
    ) -> Result<JobReply, ApiError> {
        let id = &self.id;
        let m = &id.model;
        // max_job_batch is always sent: without it server 0.9.6 dequeues a job, answers 500 and
        // the job hangs until it lapses.
        let body = json!({
            "auth": id.auth,
            "job_type": id.job_type,
            "auth_key": id.auth_key,
            "version": interface_version(),
            "worker_version": env!("CARGO_PKG_VERSION"),
            "gpu_name": id.gpu_name,
            "num_gpus": id.num_gpus,
            "request_timeout": request_timeout.as_secs_f64(),
            "model_label": m.label,
            "model_quantization": m.quantization,
            "model_size": m.size,
            "model_family": m.family,
            "model_type": m.kind,
            "model_repo_name": m.repo_name,
            "max_job_batch": max_job_batch.max(1),
            "framework": "herd",
            "framework_version": env!("CARGO_PKG_VERSION"),
        });
        let v = self.post("worker_job_request", &body, request_timeout + POLL_MARGIN)?;
        Ok(match cmd(&v) {
            Some("job") => match v.get("job_data") {
                Some(Value::Array(jobs)) if !jobs.is_empty() => JobReply::Jobs(jobs.clone()),
                // Older servers send one job's keys at the top level.
                None if v.get("job_id").is_some() => JobReply::Jobs(vec![v.clone()]),
                _ => {
                    return Err(ApiError::BadReply {
                        url: format!("{}/worker_job_request", self.base),
                        msg: format!("cmd job without job_data: {}", clip(&v.to_string())),
                    })
                }
            },
            Some("no_job") => JobReply::NoJob,
            Some("error") => JobReply::Error(message(&v)),
            Some("warning") => JobReply::Warning(message(&v)),
            _ => {
                return Err(ApiError::BadReply {
                    url: format!("{}/worker_job_request", self.base),
                    msg: format!("unknown cmd: {}", clip(&v.to_string())),
                })
            }
        })
    }

    /// `/worker_job_progress` for several jobs in one request.
    pub fn progress(&self, items: &[Progress]) -> Result<(), ApiError> {
        let body: Vec<Value> = items
            .iter()
            .map(|p| {
                json!({
                    "job_id": p.job_id,
                    "auth": self.id.auth,
                    "job_type": self.id.job_type,
                    "auth_key": self.id.auth_key,
                    "progress": p.num_generated_tokens,
                    "progress_data": {
                        "text": p.text,
                        "num_generated_tokens": p.num_generated_tokens,
                        "current_context_length": p.current_context_length,
                    },
                })
            })
            .collect();
        self.post("worker_job_progress", &Value::Array(body), SHORT_TIMEOUT)?;
        Ok(())
    }

    /// `/worker_job_result`: send exactly once per job.
    pub fn result(&self, r: &JobResult) -> Result<ResultReply, ApiError> {
        let mut body = json!({
            "text": r.text,
            "num_generated_tokens": r.num_generated_tokens,
            "model_name": self.id.model.label,
            "max_seq_len": r.max_seq_len,
            "current_context_length": r.prompt_length + r.num_generated_tokens,
            "prompt_length": r.prompt_length,
            "metrics": {
                "in_num_tokens": r.prompt_length,
                "out_num_tokens": r.num_generated_tokens,
            },
            "version": interface_version(),
            "auth": self.id.auth,
            "job_id": r.job_id,
            "job_type": self.id.job_type,
            "auth_key": self.id.auth_key,
        });
        if let (Some(e), Some(obj)) = (&r.error, body.as_object_mut()) {
            obj.insert("error".into(), Value::String(e.clone()));
        }
        let v = self.post("worker_job_result", &body, SHORT_TIMEOUT)?;
        Ok(match cmd(&v) {
            Some("ok") => ResultReply::Ok,
            _ => ResultReply::Warning(message(&v)),
        })
    }
}

fn interface_version() -> String {
    format!("herd {}", env!("CARGO_PKG_VERSION"))
}

fn cmd(v: &Value) -> Option<&str> {
    v.get("cmd").and_then(Value::as_str)
}

/// The server's explanation (`msg`, `error_msg` or `error`), else the whole reply.
fn message(v: &Value) -> String {
    ["msg", "error_msg", "error"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .map(str::to_string)
        .unwrap_or_else(|| clip(&v.to_string()))
}

/// At most 300 characters of a reply for an error message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_have_no_spaces() {
        assert_eq!(
            worker_name("node 7", 1, 2, "NVIDIA H100 80GB HBM3"),
            "node_7#1_2xNVIDIA_H100_80GB_HBM3"
        );
        assert_eq!(worker_name("h", 0, 1, "CPU"), "h#0_1xCPU");
    }

    #[test]
    fn server_messages_are_found() {
        assert_eq!(message(&json!({"cmd": "error", "msg": "no"})), "no");
        assert_eq!(
            message(&json!({"success": false, "error_msg": "bad key"})),
            "bad key"
        );
        assert!(clip(&"é".repeat(400)).ends_with('…'));
    }
}
