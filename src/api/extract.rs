//! The request-body extractor shared by every POST route, so that every
//! rejection (media type, size) answers in the API's error format.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use http_body_util::BodyExt;

use super::edge::{declared_size, HeldMemory, UNKNOWN_BODY_FIRST_BYTES};
use super::error::ApiError;
use super::AppState;

/// A request body that claims to be JSON (or claims nothing) and fits the
/// size limit. Decoding is left to `state::wire`, which keeps blobs raw.
pub struct JsonBody(pub Bytes);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, app: &AppState) -> Result<Self, ApiError> {
        if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
            let text = String::from_utf8_lossy(content_type.as_bytes()).into_owned();
            if !is_json(&text) {
                return Err(ApiError::UnsupportedMediaType(text));
            }
        }
        let limit = app.limits.max_body_bytes;
        let held = request.extensions().get::<HeldMemory>().cloned().unwrap_or_default();
        let Some(size) = declared_size(&request, limit) else {
            return read_unknown_length(request, app, &held).await.map(Self);
        };
        held.hold(&app.body_memory, size).await;
        Bytes::from_request(request, app).await.map(Self).map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit }
            } else {
                ApiError::BadJson(format!("the body could not be read ({})", rejection.body_text()))
            }
        })
    }
}

/// Reads a body sent in chunks without a length, counting its memory as
/// it arrives, a step of [`UNKNOWN_BODY_FIRST_BYTES`] at a time
/// (`HeldMemory::hold`), so that small ones so sent do not count as the
/// largest accepted.
async fn read_unknown_length(request: Request, app: &AppState, held: &HeldMemory) -> Result<Bytes, ApiError> {
    let limit = app.limits.max_body_bytes;
    let mut counted = UNKNOWN_BODY_FIRST_BYTES.min(limit);
    held.hold(&app.body_memory, counted).await;
    let mut body = request.into_body();
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| ApiError::BadJson(format!("the body could not be read ({error})")))?;
        let Ok(data) = frame.into_data() else { continue };
        if read.len() + data.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        if read.len() + data.len() > counted {
            counted = (read.len() + data.len()).next_multiple_of(UNKNOWN_BODY_FIRST_BYTES).min(limit);
            held.hold(&app.body_memory, counted).await;
        }
        read.extend_from_slice(&data);
    }
    Ok(Bytes::from(read))
}

/// `application/json`, or any `+json` type, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_media_types_are_recognised_with_parameters_and_any_case() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/problem+json"));
    }

    #[test]
    fn other_media_types_are_not_json() {
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json(""));
    }
}
