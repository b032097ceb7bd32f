//! Envoy v3 resources (`RouteConfiguration`, `Cluster`, `ClusterLoadAssignment`, and the
//! extension messages Istio puts in their `Any` fields) in protobuf-JSON form, as
//! `istioctl proxy-config ... -o json` prints them, to and from the `envoy-types` prost structs.
//!
//! `envoy-types` has no serde support, so this goes through `prost-reflect`: JSON is parsed into a
//! `DynamicMessage` against descriptors compiled by `build.rs` from the `.proto` files shipped in
//! the `envoy-types` package, encoded to protobuf bytes, and decoded as the prost struct (and the
//! reverse for [`to_json`]).
use std::sync::LazyLock;

use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use serde_json::Value;

/// `FileDescriptorSet` of the Envoy resources and their imports, compiled by `build.rs`.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(DESCRIPTORS).map_err(|err| err.to_string()));

#[derive(Debug, thiserror::Error)]
pub enum EnvoyJsonError {
    #[error("the embedded Envoy descriptors do not decode: {0}")]
    Descriptors(String),
    #[error("{type_name} is not in the embedded Envoy descriptors")]
    UnknownType { type_name: String },
    #[error("{type_name}: unknown field \"{field}\" at {path} (a {message})")]
    UnknownField {
        /// The resource being parsed.
        type_name: String,
        field: String,
        /// Where the field is, from the resource's root, e.g. `virtualHosts[0].routes[0].match`.
        path: String,
        /// The message that has no such field.
        message: String,
    },
    #[error("{type_name}: unknown Any type \"{type_url}\" at {path}")]
    UnknownAnyType {
        type_name: String,
        type_url: String,
        path: String,
    },
    #[error("{type_name}: {message}")]
    Invalid { type_name: String, message: String },
    #[error("{type_name}: does not decode as the envoy-types message: {source}")]
    Decode {
        type_name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{type_name}: cannot print as JSON: {message}")]
    Print { type_name: String, message: String },
}

/// The descriptor pool built from the embedded `FileDescriptorSet` (decoded on first use).
pub fn pool() -> Result<&'static DescriptorPool, EnvoyJsonError> {
    POOL.as_ref().map_err(|err| EnvoyJsonError::Descriptors(err.clone()))
}

fn descriptor<M: Name>() -> Result<MessageDescriptor, EnvoyJsonError> {
    let type_name = M::full_name();
    pool()?
        .get_message_by_name(&type_name)
        .ok_or(EnvoyJsonError::UnknownType { type_name })
}

/// Parses protobuf-JSON (camelCase or proto field names, `Any` with `@type`, `"0.5s"` durations,
/// enums by name) into the envoy-types message `M`. Unknown fields and `Any` types that are not
/// in the embedded descriptors are errors naming them and where they are.
pub fn from_json<M: Message + Name + Default>(value: &Value) -> Result<M, EnvoyJsonError> {
    let desc = descriptor::<M>()?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let dynamic = DynamicMessage::deserialize_with_options(desc.clone(), value, &options).map_err(|err| {
        let type_name = desc.full_name().to_owned();
        // serde's error has no path: find the offending field ourselves, if that is it.
        let mut path = String::new();
        match find_unknown(&desc, value, &mut path) {
            Some(Unknown::Field { field, message }) => EnvoyJsonError::UnknownField {
                type_name,
                field,
                path: root_if_empty(path),
                message,
            },
            Some(Unknown::AnyType { type_url }) => EnvoyJsonError::UnknownAnyType {
                type_name,
                type_url,
                path: root_if_empty(path),
            },
            None => EnvoyJsonError::Invalid {
                type_name,
                message: err.to_string(),
            },
        }
    })?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|source| EnvoyJsonError::Decode {
        type_name: M::full_name(),
        source,
    })
}

/// Prints `msg` as protobuf-JSON the way Envoy's `/config_dump` does: camelCase field names,
/// `Any` expanded with `@type`, default values left out. Fails only when an `Any` in `msg`
/// holds a type that is not in the embedded descriptors.
pub fn to_json<M: Message + Name>(msg: &M) -> Result<Value, EnvoyJsonError> {
    let desc = descriptor::<M>()?;
    let type_name = desc.full_name().to_owned();
    let dynamic =
        DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|source| EnvoyJsonError::Decode {
            type_name: type_name.clone(),
            source,
        })?;
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .map_err(|err| EnvoyJsonError::Print {
            type_name,
            message: err.to_string(),
        })
}

fn root_if_empty(path: String) -> String {
    if path.is_empty() {
        "the top level".to_owned()
    } else {
        path
    }
}

enum Unknown {
    Field { field: String, message: String },
    AnyType { type_url: String },
}

/// Walks `value` along `desc` for the first field `desc` does not have or `Any` type the pool
/// does not know, leaving `path` at the object that holds it.
fn find_unknown(desc: &MessageDescriptor, value: &Value, path: &mut String) -> Option<Unknown> {
    let Value::Object(fields) = value else {
        return None;
    };
    let full_name = desc.full_name();
    if full_name == "google.protobuf.Any" {
        let type_url = fields.get("@type")?.as_str()?;
        let name = type_url.rsplit('/').next().unwrap_or(type_url);
        let Some(inner) = desc.parent_pool().get_message_by_name(name) else {
            return Some(Unknown::AnyType {
                type_url: type_url.to_owned(),
            });
        };
        if has_special_json(inner.full_name()) {
            return None;
        }
        let rest: serde_json::Map<String, Value> = fields
            .iter()
            .filter(|(key, _)| key.as_str() != "@type")
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        return find_unknown(&inner, &Value::Object(rest), path);
    }
    if has_special_json(full_name) {
        return None;
    }
    for (key, value) in fields {
        let Some(field) = desc.get_field_by_json_name(key).or_else(|| desc.get_field_by_name(key)) else {
            // `[full.extension.name]`: extensions are not ours to check.
            if key.starts_with('[') {
                continue;
            }
            return Some(Unknown::Field {
                field: key.clone(),
                message: full_name.to_owned(),
            });
        };
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        let found = if field.is_map() {
            match (field.kind(), value) {
                (Kind::Message(entry), Value::Object(entries)) => match entry.map_entry_value_field().kind() {
                    Kind::Message(value_desc) => entries.iter().find_map(|(k, v)| {
                        let len = path.len();
                        path.push_str(&format!("[{k:?}]"));
                        let found = find_unknown(&value_desc, v, path);
                        if found.is_none() {
                            path.truncate(len);
                        }
                        found
                    }),
                    _ => None,
                },
                _ => None,
            }
        } else {
            match (field.kind(), value) {
                (Kind::Message(item), Value::Array(items)) if field.is_list() => {
                    items.iter().enumerate().find_map(|(i, v)| {
                        let len = path.len();
                        path.push_str(&format!("[{i}]"));
                        let found = find_unknown(&item, v, path);
                        if found.is_none() {
                            path.truncate(len);
                        }
                        found
                    })
                }
                (Kind::Message(inner), _) => find_unknown(&inner, value, path),
                _ => None,
            }
        };
        if found.is_some() {
            return found;
        }
        path.truncate(len);
    }
    None
}

/// Well-known types whose JSON form is not an object of their fields.
fn has_special_json(full_name: &str) -> bool {
    full_name.starts_with("google.protobuf.") && !matches!(full_name, "google.protobuf.Any" | "google.protobuf.Empty")
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
    use envoy_types::pb::envoy::config::route::v3::{
        header_matcher, route, route_action, route_match, RouteConfiguration,
    };
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, HttpFault};
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    use envoy_types::pb::google::protobuf::Duration;
    use serde_json::json;

    const V1: &str = "outbound|9080|v1|reviews.default.svc.cluster.local";
    const V2: &str = "outbound|9080|v2|reviews.default.svc.cluster.local";
    const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
    const PREVIOUS_HOSTS: &str =
        "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

    /// A route configuration as `istioctl proxy-config routes ... -o json` prints it.
    fn route_json() -> Value {
        json!({
            "name": "9080",
            "virtualHosts": [{
                "name": "reviews.default.svc.cluster.local:9080",
                "domains": ["reviews.default.svc.cluster.local", "reviews", "reviews:9080"],
                "routes": [{
                    "name": "reviews-split",
                    "match": {
                        "prefix": "/",
                        "caseSensitive": true,
                        "headers": [{
                            "name": "end-user",
                            "stringMatch": {"exact": "jason"}
                        }]
                    },
                    "route": {
                        "weightedClusters": {
                            "clusters": [
                                {"name": V1, "weight": 20},
                                {"name": V2, "weight": 80}
                            ]
                        },
                        "timeout": "0.5s",
                        "retryPolicy": {
                            "retryOn": "5xx,connect-failure",
                            "numRetries": 2,
                            "perTryTimeout": "0.200s",
                            "retryHostPredicate": [{
                                "name": "envoy.retry_host_predicates.previous_hosts",
                                "typedConfig": {"@type": PREVIOUS_HOSTS}
                            }],
                            "hostSelectionRetryMaxAttempts": "5",
                            "retriableStatusCodes": [503]
                        },
                        "requestMirrorPolicies": [{
                            "cluster": V2,
                            "runtimeFraction": {"defaultValue": {"numerator": 100}},
                            "traceSampled": false
                        }]
                    },
                    "typedPerFilterConfig": {
                        "envoy.filters.http.fault": {
                            "@type": FAULT,
                            "abort": {
                                "httpStatus": 503,
                                "percentage": {"numerator": 100000, "denominator": "MILLION"}
                            }
                        }
                    },
                    "decorator": {"operation": "reviews.default.svc.cluster.local:9080/*"}
                }],
                "includeRequestAttemptCount": true
            }],
            "validateClusters": false,
            "ignorePortInHostMatching": true
        })
    }

    fn check_route(config: &RouteConfiguration) {
        assert_eq!(config.name, "9080");
        assert!(!config.validate_clusters.is_some_and(|v| v.value));
        assert!(config.ignore_port_in_host_matching);
        let vh = &config.virtual_hosts[0];
        assert_eq!(
            vh.domains,
            ["reviews.default.svc.cluster.local", "reviews", "reviews:9080"]
        );
        assert!(vh.include_request_attempt_count);
        let r = &vh.routes[0];
        let m = r.r#match.as_ref().expect("match");
        assert_eq!(m.path_specifier, Some(route_match::PathSpecifier::Prefix("/".into())));
        assert_eq!(m.case_sensitive.as_ref().map(|v| v.value), Some(true));
        assert_eq!(m.headers[0].name, "end-user");
        let Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) = &m.headers[0].header_match_specifier else {
            panic!("string match: {:?}", m.headers[0]);
        };
        assert_eq!(
            sm.match_pattern,
            Some(string_matcher::MatchPattern::Exact("jason".into()))
        );
        let Some(route::Action::Route(action)) = &r.action else {
            panic!("route action: {:?}", r.action);
        };
        let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier else {
            panic!("weighted clusters: {:?}", action.cluster_specifier);
        };
        let clusters: Vec<(&str, u32)> = wc
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.as_ref().map_or(0, |w| w.value)))
            .collect();
        assert_eq!(clusters, [(V1, 20), (V2, 80)]);
        let half_second = Duration {
            seconds: 0,
            nanos: 500_000_000,
        };
        assert_eq!(action.timeout, Some(half_second));
        let retry = action.retry_policy.as_ref().expect("retry policy");
        assert_eq!(retry.retry_on, "5xx,connect-failure");
        assert_eq!(retry.num_retries.as_ref().map(|n| n.value), Some(2));
        assert_eq!(
            retry.per_try_timeout,
            Some(Duration {
                seconds: 0,
                nanos: 200_000_000
            })
        );
        assert_eq!(retry.host_selection_retry_max_attempts, 5);
        assert_eq!(retry.retriable_status_codes, [503]);
        let predicate = &retry.retry_host_predicate[0];
        assert_eq!(predicate.name, "envoy.retry_host_predicates.previous_hosts");
        let Some(
            envoy_types::pb::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any),
        ) = &predicate.config_type
        else {
            panic!("typed config: {predicate:?}");
        };
        assert_eq!(any.type_url, PREVIOUS_HOSTS);
        assert!(any.value.is_empty());
        let mirror = &action.request_mirror_policies[0];
        assert_eq!(mirror.cluster, V2);
        let fraction = mirror.runtime_fraction.as_ref().expect("runtime fraction");
        let percent = fraction.default_value.as_ref().expect("default value");
        assert_eq!(percent.numerator, 100);
        assert_eq!(percent.denominator, DenominatorType::Hundred as i32);
        assert_eq!(mirror.trace_sampled.as_ref().map(|v| v.value), Some(false));
        let any = &r.typed_per_filter_config["envoy.filters.http.fault"];
        assert_eq!(any.type_url, FAULT);
        let fault = HttpFault::decode(any.value.as_slice()).expect("HTTPFault");
        let abort = fault.abort.expect("abort");
        assert_eq!(abort.error_type, Some(fault_abort::ErrorType::HttpStatus(503)));
        let percentage = abort.percentage.expect("percentage");
        assert_eq!(percentage.numerator, 100_000);
        assert_eq!(percentage.denominator, DenominatorType::Million as i32);
        assert_eq!(
            r.decorator.as_ref().map(|d| d.operation.as_str()),
            Some("reviews.default.svc.cluster.local:9080/*")
        );
    }

    #[test]
    fn envoy_json_route_configuration() {
        let config: RouteConfiguration = from_json(&route_json()).expect("parse");
        check_route(&config);
    }

    #[test]
    fn envoy_json_route_round_trip() {
        let config: RouteConfiguration = from_json(&route_json()).expect("parse");
        let printed = to_json(&config).expect("print");
        // Envoy's form: camelCase, Any expanded, durations as strings, defaults left out.
        let route = &printed["virtualHosts"][0]["routes"][0];
        assert_eq!(route["route"]["timeout"], "0.500s");
        assert_eq!(route["match"]["prefix"], "/");
        assert_eq!(
            route["typedPerFilterConfig"]["envoy.filters.http.fault"]["@type"],
            FAULT
        );
        assert_eq!(
            route["typedPerFilterConfig"]["envoy.filters.http.fault"]["abort"]["httpStatus"],
            503
        );
        assert_eq!(
            route["route"]["retryPolicy"]["retryHostPredicate"][0]["typedConfig"]["@type"],
            PREVIOUS_HOSTS
        );
        assert!(printed.get("validateClusters").is_some());
        assert!(printed.get("mostSpecificHeaderMutationsWins").is_none());
        let again: RouteConfiguration = from_json(&printed).expect("parse printed");
        assert_eq!(again, config);
        check_route(&again);
    }

    #[test]
    fn envoy_json_snake_case_and_yaml() {
        let yaml = r#"
name: "9080"
virtual_hosts:
- name: reviews
  domains: [reviews.default.svc.cluster.local, reviews, "reviews:9080"]
  routes:
  - match: {prefix: /api, headers: [{name: end-user, string_match: {exact: jason}}]}
    route:
      cluster: outbound|9080|v1|reviews.default.svc.cluster.local
      timeout: 1.5s
      retry_policy: {retry_on: "5xx,connect-failure", num_retries: 3}
"#;
        let value: Value = serde_yaml::from_str(yaml).expect("yaml");
        let config: RouteConfiguration = from_json(&value).expect("parse");
        assert_eq!(config.name, "9080");
        let vh = &config.virtual_hosts[0];
        assert_eq!(vh.domains.len(), 3);
        let r = &vh.routes[0];
        let m = r.r#match.as_ref().expect("match");
        assert_eq!(
            m.path_specifier,
            Some(route_match::PathSpecifier::Prefix("/api".into()))
        );
        assert!(matches!(
            &m.headers[0].header_match_specifier,
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm))
                if sm.match_pattern == Some(string_matcher::MatchPattern::Exact("jason".into()))
        ));
        let Some(route::Action::Route(action)) = &r.action else {
            panic!("route action: {:?}", r.action);
        };
        assert_eq!(
            action.cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(V1.into()))
        );
        assert_eq!(
            action.timeout,
            Some(Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        let retry = action.retry_policy.as_ref().expect("retry");
        assert_eq!(retry.retry_on, "5xx,connect-failure");
        assert_eq!(retry.num_retries.as_ref().map(|n| n.value), Some(3));
    }

    #[test]
    fn envoy_json_cluster() {
        let value = json!({
            "name": V1,
            "type": "EDS",
            "edsClusterConfig": {
                "edsConfig": {"ads": {}, "initialFetchTimeout": "0s", "resourceApiVersion": "V3"},
                "serviceName": V1
            },
            "connectTimeout": "10s",
            "lbPolicy": "LEAST_REQUEST",
            "circuitBreakers": {
                "thresholds": [{
                    "maxConnections": 4294967295u32,
                    "maxPendingRequests": 100,
                    "maxRequests": 4294967295u32,
                    "maxRetries": 4294967295u32,
                    "trackRemaining": true
                }]
            },
            "outlierDetection": {
                "consecutive5xx": 7,
                "interval": "30s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 100,
                "enforcingConsecutive5xx": 100
            },
            "commonLbConfig": {},
            "typedExtensionProtocolOptions": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "useDownstreamProtocolConfig": {"httpProtocolOptions": {}, "http2ProtocolOptions": {}}
                }
            },
            "transportSocket": {
                "name": "envoy.transport_sockets.tls",
                "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "commonTlsContext": {"alpnProtocols": ["istio-peer-exchange", "istio"]},
                    "sni": "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
                }
            }
        });
        let cluster: Cluster = from_json(&value).expect("parse");
        assert_eq!(cluster.name, V1);
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32))
        );
        assert_eq!(cluster.lb_policy, cluster::LbPolicy::LeastRequest as i32);
        assert_eq!(cluster.connect_timeout, Some(Duration { seconds: 10, nanos: 0 }));
        let thresholds = &cluster.circuit_breakers.as_ref().expect("cb").thresholds[0];
        assert_eq!(thresholds.max_connections.as_ref().map(|v| v.value), Some(u32::MAX));
        assert_eq!(thresholds.max_pending_requests.as_ref().map(|v| v.value), Some(100));
        let outlier = cluster.outlier_detection.as_ref().expect("outlier");
        assert_eq!(outlier.consecutive_5xx.as_ref().map(|v| v.value), Some(7));
        assert_eq!(outlier.base_ejection_time, Some(Duration { seconds: 30, nanos: 0 }));
        let tls = cluster.transport_socket.as_ref().expect("transport socket");
        assert_eq!(tls.name, "envoy.transport_sockets.tls");
        let again: Cluster = from_json(&to_json(&cluster).expect("print")).expect("parse again");
        assert_eq!(again, cluster);
        let printed = to_json(&cluster).expect("print");
        assert_eq!(printed["type"], "EDS");
        assert_eq!(printed["lbPolicy"], "LEAST_REQUEST");
        assert_eq!(printed["outlierDetection"]["consecutive5xx"], 7);
        assert_eq!(
            printed["transportSocket"]["typedConfig"]["sni"],
            "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
        );
    }

    #[test]
    fn envoy_json_cluster_load_assignment() {
        let value = json!({
            "clusterName": V1,
            "endpoints": [{
                "locality": {"region": "us-east1", "zone": "us-east1-b"},
                "lbEndpoints": [
                    {
                        "endpoint": {"address": {"socketAddress": {"address": "10.0.0.5", "portValue": 9080}}},
                        "healthStatus": "HEALTHY",
                        "loadBalancingWeight": 1
                    },
                    {
                        "endpoint": {"address": {"socketAddress": {"address": "10.0.1.7", "portValue": 9081}}},
                        "healthStatus": "HEALTHY",
                        "loadBalancingWeight": 1
                    }
                ],
                "loadBalancingWeight": 2
            }]
        });
        let cla: ClusterLoadAssignment = from_json(&value).expect("parse");
        assert_eq!(cla.cluster_name, V1);
        let locality = &cla.endpoints[0];
        assert_eq!(locality.locality.as_ref().map(|l| l.zone.as_str()), Some("us-east1-b"));
        let addresses: Vec<(String, u32)> = locality
            .lb_endpoints
            .iter()
            .map(|lb| {
                let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                    panic!("endpoint: {lb:?}");
                };
                let address = endpoint.address.as_ref().expect("address");
                let Some(address::Address::SocketAddress(sa)) = &address.address else {
                    panic!("socket address: {address:?}");
                };
                let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                    panic!("port: {sa:?}");
                };
                (sa.address.clone(), port)
            })
            .collect();
        assert_eq!(
            addresses,
            [("10.0.0.5".to_owned(), 9080), ("10.0.1.7".to_owned(), 9081)]
        );
        let again: ClusterLoadAssignment = from_json(&to_json(&cla).expect("print")).expect("parse again");
        assert_eq!(again, cla);
    }

    #[test]
    fn envoy_json_unknown_field_is_named() {
        let mut value = route_json();
        value["virtualHosts"][0]["routes"][0]["match"] = json!({"prefx": "/"});
        let err = from_json::<RouteConfiguration>(&value).expect_err("unknown field");
        let EnvoyJsonError::UnknownField {
            field, path, message, ..
        } = &err
        else {
            panic!("wrong error: {err}");
        };
        assert_eq!(field, "prefx");
        assert_eq!(path, "virtualHosts[0].routes[0].match");
        assert_eq!(message, "envoy.config.route.v3.RouteMatch");
        let text = err.to_string();
        assert!(text.contains("RouteConfiguration"), "{text}");
        assert!(text.contains("unknown field \"prefx\""), "{text}");

        // Inside an Any, too.
        let mut value = route_json();
        value["virtualHosts"][0]["routes"][0]["typedPerFilterConfig"]["envoy.filters.http.fault"]["abort"]
            ["httpStatuz"] = json!(500);
        let err = from_json::<RouteConfiguration>(&value).expect_err("unknown field in Any");
        assert!(
            matches!(&err, EnvoyJsonError::UnknownField { field, path, .. }
                if field == "httpStatuz"
                && path == "virtualHosts[0].routes[0].typedPerFilterConfig[\"envoy.filters.http.fault\"].abort"),
            "{err}"
        );

        let err = from_json::<RouteConfiguration>(&json!({"nmae": "x"})).expect_err("top level");
        assert!(
            matches!(&err, EnvoyJsonError::UnknownField { field, .. } if field == "nmae"),
            "{err}"
        );
    }

    #[test]
    fn envoy_json_unknown_any_type_is_named() {
        let url = "type.googleapis.com/istio.envoy.config.filter.http.NoSuchFilter";
        let mut value = route_json();
        value["virtualHosts"][0]["routes"][0]["typedPerFilterConfig"]["istio.nosuch"] = json!({"@type": url, "x": 1});
        let err = from_json::<RouteConfiguration>(&value).expect_err("unknown Any");
        let EnvoyJsonError::UnknownAnyType { type_url, path, .. } = &err else {
            panic!("wrong error: {err}");
        };
        assert_eq!(type_url, url);
        assert_eq!(path, "virtualHosts[0].routes[0].typedPerFilterConfig[\"istio.nosuch\"]");
        assert!(err.to_string().contains(url), "{err}");
    }

    #[test]
    fn envoy_json_bad_value_is_an_error() {
        let err = from_json::<Cluster>(&json!({"name": "c", "lbPolicy": "FASTEST"})).expect_err("bad enum");
        assert!(
            matches!(&err, EnvoyJsonError::Invalid { type_name, .. }
                if type_name == "envoy.config.cluster.v3.Cluster"),
            "{err}"
        );
    }
}
