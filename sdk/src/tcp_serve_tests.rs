use super::*;
use tokio::net::UnixStream;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn goodbye_is_read_whole_even_if_the_client_sent_more_after_it() {
    runtime().block_on(async {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut server = Stream::Unix(server);
        // The client's next message is in flight when the server says goodbye.
        client.write_all(b"unanswered\n").await.unwrap();
        let bye = tokio::spawn(async move { server.goodbye(b"BYE\n").await });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"BYE\n");
        // The server waits for our FIN (it reads on, discarding), and ends when it comes.
        client.write_all(b"more after the goodbye\n").await.unwrap();
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), bye)
            .await
            .expect("goodbye did not end at the client's FIN")
            .unwrap()
            .unwrap();
    });
}

#[test]
fn goodbye_to_a_client_that_never_closes_ends_after_the_linger() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut server = Stream::Unix(server);
        let started = tokio::time::Instant::now();
        server.goodbye(b"BYE\n").await.unwrap();
        assert!(started.elapsed() >= GOODBYE_LINGER);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"BYE\n");
    });
}
