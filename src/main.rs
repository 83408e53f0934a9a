//! The `channels` binary: configuration → logging → node → graceful shutdown,
//! plus the operator's token tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use channels::{
    auth::WsTokens,
    config::{Config, Secret, dev},
    notification::KeycloakId,
};

#[derive(Parser)]
#[command(version, about = "Real-time notification gateway (socket.io + HTTP)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default).
    Serve {
        /// Dev mode: fixed, public secrets and no setup (never in production).
        #[arg(long, env = "CHANNELS_DEV")]
        dev: bool,
    },
    /// Print a signed token for a user: an upstream access token, as the
    /// identity provider would issue (HS256 setups and dev mode), or with
    /// `--ws` a ws token for a socket connection.
    GenToken {
        /// The keycloak id (`sub`) of the token.
        #[arg(long)]
        user: String,
        /// Mint a ws token instead of an upstream access token.
        #[arg(long)]
        ws: bool,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Use the dev-mode secrets.
        #[arg(long, env = "CHANNELS_DEV")]
        dev: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { dev: false }) {
        Command::Serve { dev } => serve(dev),
        Command::GenToken { user, ws, ttl, dev } => gen_token(&user, ws, ttl, dev),
    }
}

fn serve(dev_mode: bool) -> ExitCode {
    init_logging();
    let config = match Config::from_env(dev_mode) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("channels: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if config.dev_mode {
        tracing::warn!(
            "DEV MODE: fixed public secrets, API key {:?}; never use in production",
            dev::API_KEY
        );
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "channels: cannot listen on {} (CHANNELS_LISTEN): {e}",
                    config.listen
                );
                return ExitCode::from(2);
            }
        };
        let node = match channels::start(config, listener).await {
            Ok(node) => node,
            Err(e) => {
                eprintln!("channels: {e}");
                return ExitCode::from(2);
            }
        };
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        if node.shutdown().await {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// `CHANNELS_LOG` (an `EnvFilter`, default `info`) and `CHANNELS_LOG_FORMAT`
/// (`pretty` or `json`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHANNELS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("CHANNELS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

fn gen_token(user: &str, ws: bool, ttl: u64, dev_mode: bool) -> ExitCode {
    let user = match KeycloakId::parse(user) {
        Ok(user) => user,
        Err(e) => {
            eprintln!("channels: --user {e}");
            return ExitCode::from(2);
        }
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if ws {
        let secret = var("CHANNELS_WS_TOKEN_SECRET")
            .or_else(|| dev_mode.then(|| dev::WS_TOKEN_SECRET.to_string()));
        let Some(secret) = secret else {
            eprintln!("channels: CHANNELS_WS_TOKEN_SECRET is required (or --dev)");
            return ExitCode::from(2);
        };
        let tokens = WsTokens::new(&Secret::new(secret), std::time::Duration::from_secs(ttl));
        println!("{}", tokens.mint(&user));
        return ExitCode::SUCCESS;
    }
    let secret = var("CHANNELS_AUTH_HS256_SECRET")
        .or_else(|| dev_mode.then(|| dev::UPSTREAM_SECRET.to_string()));
    let Some(secret) = secret else {
        eprintln!(
            "channels: CHANNELS_AUTH_HS256_SECRET is required (or --dev); \
             with a JWKS, tokens come from the identity provider"
        );
        return ExitCode::from(2);
    };
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({"sub": user.as_str(), "iat": now, "exp": now + ttl});
    if let Some(iss) = var("CHANNELS_AUTH_ISSUER") {
        claims["iss"] = iss.split(',').next().unwrap_or_default().trim().into();
    }
    if let Some(aud) = var("CHANNELS_AUTH_AUDIENCE") {
        claims["aud"] = aud.split(',').next().unwrap_or_default().trim().into();
    }
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail");
    println!("{token}");
    ExitCode::SUCCESS
}
