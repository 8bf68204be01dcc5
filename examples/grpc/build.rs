//! Generates the `hello.Greeter` server stub with tonic-build's manual builder: the service is
//! described in Rust and the messages are hand-written prost types (src/lib.rs), so no
//! `protoc` is needed.

fn main() {
    let greeter = tonic_build::manual::Service::builder()
        .name("Greeter")
        .package("hello")
        .method(
            tonic_build::manual::Method::builder()
                .name("say_hello")
                .route_name("SayHello")
                .input_type("crate::HelloRequest")
                .output_type("crate::HelloReply")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[greeter]);
}
