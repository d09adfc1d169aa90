//! Just enough OpenAPI v3 for `kubectl create`/`apply`: before sending an object kubectl
//! checks that the server validates fields itself (a `fieldValidation` query parameter on
//! the kind's PATCH operation, found by its `x-kubernetes-group-version-kind`); without
//! that it wants the whole schema to validate on its own side.

use serde_json::{json, Value};

/// Where the core group's document is, relative to the server.
const CORE_V1: &str = "/openapi/v3/api/v1";

/// `/openapi/v3`: the index of documents per group version.
pub fn index() -> Value {
    json!({"paths": {"api/v1": {"serverRelativeURL": format!("{CORE_V1}?hash=kas-testkit")}}})
}

/// `/openapi/v3/api/v1`: each served kind's PATCH operation with its `fieldValidation`.
pub fn core_v1() -> Value {
    let mut paths = serde_json::Map::new();
    for (resource, kind) in [
        ("pods", "Pod"),
        ("configmaps", "ConfigMap"),
        ("secrets", "Secret"),
    ] {
        paths.insert(
            format!("/api/v1/namespaces/{{namespace}}/{resource}/{{name}}"),
            json!({
                "patch": {
                    "operationId": format!("patchCoreV1Namespaced{kind}"),
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
                    ],
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": kind}
                }
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": super::objects::GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}}
    })
}
