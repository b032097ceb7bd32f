//! Envoy's shadow writer: request mirrors, fire and forget, with `-shadow` on the authority;
//! their answers are dropped. Only a buffered body is mirrored.
use http::header;
use http_body_util::BodyExt;

use super::{
    body::{full, Buffered},
    fault::roll,
    headers,
    rewrite::{build_uri, shadow_host},
    router::Downstream,
    upstream_request::{Head, UpstreamRequest},
};
use crate::{l7::L7Config, route::RouteAction};

/// Sends a copy of the request to each of the route's mirrors its percentage selects.
pub fn mirror(conn: &Downstream, l7: &L7Config, ra: &RouteAction, head: &Head, body: &Buffered) {
    for m in ra.mirrors.iter().filter(|m| roll(m.fraction_per_million)) {
        let Some(cluster) = l7.cluster(&m.cluster) else {
            continue;
        };
        let authority = head.uri.authority().map_or("", |a| a.as_str());
        let authority = if m.shadow_host_suffix {
            shadow_host(authority)
        } else {
            authority.to_string()
        };
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = build_uri(&authority, path) else {
            continue;
        };
        let mut shadow = Head { uri, ..head.clone() };
        shadow.headers.insert(header::HOST, headers::value(&authority));
        let Some(state) = conn.source.upstreams().get(&cluster.name) else {
            continue;
        };
        let dst = conn.dst;
        let source = conn.source.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let Ok(_guard) = state.admit_request() else { return };
            let Some(endpoint) = state.pick_for(dst, None, &[], 1) else {
                return;
            };
            let upstream = UpstreamRequest {
                cluster: &state,
                via: source.connector(),
                endpoint,
                per_try_timeout: None,
            };
            // `body` keeps its bytes in the buffer budget until the mirror is done.
            if let Ok(resp) = upstream
                .send(shadow.version, shadow.request(full(body.bytes.clone()), None))
                .await
            {
                let _ = resp.into_body().collect().await;
            }
        });
    }
}
