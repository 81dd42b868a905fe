//! Prints the REST mapping's OpenAPI document, as `GET /openapi.json`
//! serves it: `scripts/gen-openapi` writes it to docs/openapi.json.

fn main() {
    print!("{}", keycap_control::rest::openapi_document());
}
