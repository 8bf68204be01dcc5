//! `grpc-example`: a tonic gRPC service (`hello.Greeter/SayHello`) served by angel-host over
//! HTTP/2 with [`angel::export_tower!`]: a tonic server is a tower service like any other.
//!
//! The protocol, as a `.proto` would say it (no `protoc` is needed: the messages below are
//! hand-written prost types, the server stub comes from tonic-build's manual builder):
//!
//! ```text
//! package hello;
//! service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; uint32 pid = 2; }
//! ```

use std::convert::Infallible;

use tonic::{Request, Response, Status};

/// `hello.HelloRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// Who to greet.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `hello.HelloReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// `Hello, <name>`.
    #[prost(string, tag = "1")]
    pub message: String,
    /// The worker process that answered.
    #[prost(uint32, tag = "2")]
    pub pid: u32,
}

#[allow(missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/hello.Greeter.rs"));
}

use generated::greeter_server::{Greeter, GreeterServer};

/// The service.
#[derive(Debug, Default)]
pub struct Greetings;

#[tonic::async_trait]
impl Greeter for Greetings {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}"),
            pid: std::process::id(),
        }))
    }
}

async fn make_service(_worker: &angel::Worker) -> Result<GreeterServer<Greetings>, Infallible> {
    Ok(GreeterServer::new(Greetings))
}

angel::export_tower!(init = make_service);
