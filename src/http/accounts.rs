//! Built-in accounts over HTTP (`--accounts-db`): `POST /register`, `POST /token` (the OAuth2
//! password grant, as a form or as JSON), `POST /token/refresh`, `GET /users/me`. The store,
//! the name and password rules and the hashing are `core::accounts`'; here are the parsing,
//! the limits checked before any hash is computed, and the answers.

use std::net::IpAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::read::read_body;
use super::reply::{self, ApiError, Reply};
use super::Api;
use crate::config::rate::RateSpec;
use crate::config::Registration;
use crate::core::accounts::{check_name, name_key, AccountError, Accounts, MAX_PASSWORD_BYTES};
use crate::core::auth::Issuer;
use crate::core::limit::PerIpRate;
use crate::core::lockout::Lockout;
use crate::core::stats::AccountStats;

/// Largest body of a registration or a login: a 1024-byte password percent-encoded in a form
/// takes 3 KiB; JSON escapes of control characters up to 6 bytes each.
const MAX_BODY: usize = 8 * 1024;

/// Failed logins for one account forgiven before its lockout, whatever the addresses they came
/// from; after them, one try per `NAME_INTERVAL` (the account's owner included, which is the
/// price of stopping a guesser that spreads over many addresses).
pub const NAME_BURST: u32 = 10;
pub const NAME_INTERVAL: Duration = Duration::from_secs(6);

/// What the account routes need; built by `server::run` when `--accounts-db` is set.
pub struct AccountRoutes {
    accounts: Accounts,
    /// Signs with `--jwt-secret` (and `--jwt-audience` / `--jwt-issuer`), so the server's own
    /// verifier accepts what it issues.
    issuer: Issuer,
    /// `--accounts-token-ttl`.
    ttl: Duration,
    /// `--accounts-rooms`: the `rooms` claim of every token issued.
    rooms: String,
    /// `--accounts-register`.
    registration: Registration,
    /// `--accounts-register-rate`, per client address.
    register_rate: Option<PerIpRate>,
    /// Failed logins per client address: the failure lockout's rules (`lockout::BURST` forgiven,
    /// then one per `lockout::INTERVAL`), in a table of their own.
    by_address: Lockout,
    /// Failed logins per account, whatever the address.
    by_name: Lockout,
}

impl AccountRoutes {
    pub fn new(
        accounts: Accounts,
        issuer: Issuer,
        ttl: Duration,
        rooms: String,
        registration: Registration,
        register_rate: Option<RateSpec>,
    ) -> Self {
        AccountRoutes {
            accounts,
            issuer,
            ttl,
            rooms,
            registration,
            register_rate: register_rate.map(PerIpRate::new),
            by_address: Lockout::default(),
            by_name: Lockout::new(NAME_BURST, NAME_INTERVAL),
        }
    }

    pub fn registration(&self) -> Registration {
        self.registration
    }

    /// A token for `name`, as `POST /token` answers it.
    fn token(&self, name: &str) -> Reply {
        let (token, _exp) = self
            .issuer
            .issue(name, Some(&self.rooms), self.ttl)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot sign an account's token");
                internal()
            })?;
        Ok(reply::json(
            StatusCode::OK,
            &TokenReply {
                access_token: &token,
                token_type: "bearer",
                expires_in: self.ttl.as_secs(),
            },
        ))
    }
}

/// RFC 6749 § 5.1's answer.
#[derive(Serialize)]
struct TokenReply<'a> {
    access_token: &'a str,
    token_type: &'static str,
    /// Seconds.
    expires_in: u64,
}

/// A registration's or a login's body. Other fields (`scope`, `client_id`, `client_secret`,
/// which OAuth2 clients send) are ignored.
#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
    /// OAuth2's; `password` when present.
    #[serde(default)]
    grant_type: Option<String>,
}

fn accounts_off() -> ApiError {
    ApiError::not_found(
        "accounts_off",
        "this server has no built-in accounts (--accounts-db)",
    )
}

fn internal() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the accounts database failed; see the server's log",
    )
}

/// 401 for a wrong name or password: one body for both, so that it tells nobody which names
/// exist.
fn bad_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "bad_credentials",
        "wrong user name or password",
    )
    .with_challenge()
}

/// The answer to an account error.
fn refusal(stats: &AccountStats, e: AccountError) -> ApiError {
    match e {
        AccountError::BadName(reason) => {
            stats.register_refused.inc();
            ApiError::bad_request("bad_user", reason)
        }
        AccountError::BadPassword(reason) => {
            stats.register_refused.inc();
            ApiError::bad_request("bad_password", reason)
        }
        AccountError::NameTaken => {
            stats.register_refused.inc();
            ApiError::new(
                StatusCode::CONFLICT,
                "name_taken",
                "the user name is taken (names are unique ignoring case and width)",
            )
        }
        AccountError::Busy => {
            stats.busy.inc();
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "accounts_busy",
                "too many password checks are waiting: try again shortly",
            )
            .retry_after(Duration::from_secs(1))
        }
        e => {
            tracing::error!(error = %e, "accounts");
            internal()
        }
    }
}

/// The body of a registration or a login: a form (`application/x-www-form-urlencoded`, as
/// OAuth2 clients send it) or JSON (`application/json`, or no `Content-Type`), at most
/// `MAX_BODY` bytes, whole within `--body-timeout`.
async fn credentials(api: &Api, req: Request<Incoming>) -> Result<Credentials, ApiError> {
    let stats = &api.stats.accounts;
    let malformed = |e: ApiError| {
        stats.malformed.inc();
        if e.code() == "body_timeout" {
            api.stats.dropped.body_timeouts.inc();
        }
        e
    };
    let form = match req.headers().get(CONTENT_TYPE).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) => {
            let mime = v.split(';').next().unwrap_or("").trim();
            if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
                true
            } else if mime.eq_ignore_ascii_case("application/json") {
                false
            } else {
                return Err(malformed(unsupported()));
            }
        }
        Some(Err(_)) => return Err(malformed(unsupported())),
    };
    let body = read_body(req, MAX_BODY, "8192 bytes", api.body_timeout)
        .await
        .map_err(malformed)?;
    let parsed = if form {
        serde_urlencoded::from_bytes::<Credentials>(&body).map_err(|e| {
            // `curl -d '{…}'` sends JSON labelled as a form.
            if body.starts_with(b"{") {
                format!("{e} (a JSON body needs `Content-Type: application/json`)")
            } else {
                e.to_string()
            }
        })
    } else {
        serde_json::from_slice::<Credentials>(&body).map_err(|e| e.to_string())
    };
    let creds = parsed.map_err(|e| {
        malformed(ApiError::bad_request(
            "bad_request",
            format!(
                "the body must hold a `username` and a `password` (a form or a JSON object): {e}"
            ),
        ))
    })?;
    if creds.grant_type.as_deref().is_some_and(|g| g != "password") {
        return Err(malformed(ApiError::bad_request(
            "unsupported_grant_type",
            "`grant_type` must be `password` (or absent)",
        )));
    }
    Ok(creds)
}

fn unsupported() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send application/x-www-form-urlencoded or application/json",
    )
}

/// `POST /register`: 201 `{"username"}` (the name as registered).
pub async fn register(api: &Api, peer: IpAddr, req: Request<Incoming>) -> Reply {
    let routes = api.accounts.as_ref().ok_or_else(accounts_off)?;
    let stats = &api.stats.accounts;
    if routes.registration == Registration::Closed {
        stats.register_refused.inc();
        return Err(ApiError::forbidden(
            "registration_closed",
            "registration is closed on this server: the operator creates accounts",
        ));
    }
    if let Some(rate) = &routes.register_rate {
        rate.check(peer).map_err(|wait| {
            stats.register_limited.inc();
            ApiError::rate_limited(
                "too many registrations from this address (--accounts-register-rate)",
                wait,
            )
        })?;
    }
    let creds = credentials(api, req).await?;
    let account = routes
        .accounts
        .register(&creds.username, &creds.password)
        .await
        .map_err(|e| refusal(stats, e))?;
    stats.registered.inc();
    tracing::info!(user = %account.name, "account registered");
    Ok(reply::json(
        StatusCode::CREATED,
        &json!({"username": account.name}),
    ))
}

/// `POST /token`: the OAuth2 password grant. A locked address or account is refused before
/// any hash; a wrong name and a wrong password get the same 401.
pub async fn token(api: &Api, peer: IpAddr, req: Request<Incoming>) -> Reply {
    let routes = api.accounts.as_ref().ok_or_else(accounts_off)?;
    let stats = &api.stats.accounts;
    let creds = credentials(api, req).await?;
    // A name no account can have, or a password no account can have, is checked against
    // nothing: the answer is the same 401, and the rules are public.
    let possible =
        check_name(&creds.username).is_ok() && creds.password.len() <= MAX_PASSWORD_BYTES;
    let key = name_key(&creds.username);
    let locked = routes.by_address.check(peer, "").and_then(|()| {
        if possible {
            routes.by_name.check_subject(&key)
        } else {
            Ok(())
        }
    });
    if let Err(wait) = locked {
        stats.login_limited.inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            "too many failed logins from this address or for this account: try again later",
        )
        .retry_after(wait));
    }
    let account = if possible {
        routes
            .accounts
            .login(&creds.username, &creds.password)
            .await
            .map_err(|e| refusal(stats, e))?
    } else {
        None
    };
    let Some(account) = account else {
        // The refusal at hand is answered as it is; the lockout bites on the next attempt.
        let _ = routes.by_address.failed(peer, "");
        if possible {
            let _ = routes.by_name.failed_subject(&key);
        }
        stats.login_failures.inc();
        return Err(bad_credentials());
    };
    let reply = routes.token(&account.name)?;
    stats.logins.inc();
    Ok(reply)
}

/// The account of the request's bearer token: 401 without a valid token (as every route that
/// needs one), and 401 `no_account` when the token's user has no account (deleted, or a token
/// made by `roomcast token` for a name nobody registered).
async fn bearer_account(
    api: &Api,
    routes: &AccountRoutes,
    peer: IpAddr,
    req: &Request<Incoming>,
) -> Result<crate::core::accounts::Account, ApiError> {
    let grant = api.access.grant(req, peer, None, None)?.ok_or_else(|| {
        // Accounts need --jwt-secret, so tokens are on; this is a safety net.
        ApiError::unauthorized("an access token is required")
    })?;
    let account = routes
        .accounts
        .find(&grant.user)
        .await
        .map_err(|e| refusal(&api.stats.accounts, e))?;
    // The key matches any spelling; the token must name the account as registered.
    match account {
        Some(account) if account.name == *grant.user => Ok(account),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_account",
            "the access token's user has no account here",
        )
        .with_challenge()),
    }
}

/// `POST /token/refresh`: a fresh token for a valid one whose account still exists. No
/// password is kept anywhere: this is how a page stays logged in.
pub async fn refresh(api: &Api, peer: IpAddr, req: Request<Incoming>) -> Reply {
    let routes = api.accounts.as_ref().ok_or_else(accounts_off)?;
    let account = bearer_account(api, routes, peer, &req).await?;
    let reply = routes.token(&account.name)?;
    api.stats.accounts.refreshed.inc();
    Ok(reply)
}

/// `GET /users/me`: `{"username","created_at"}` (Unix milliseconds).
pub async fn me(api: &Api, peer: IpAddr, req: Request<Incoming>) -> Reply {
    let routes = api.accounts.as_ref().ok_or_else(accounts_off)?;
    let account = bearer_account(api, routes, peer, &req).await?;
    Ok(reply::json(
        StatusCode::OK,
        &json!({"username": account.name, "created_at": account.created_at}),
    ))
}

/// `GET /api/server`: what a page or client needs to know to show the right forms.
pub fn server(api: &Api) -> hyper::Response<reply::Body> {
    let register = api.accounts.as_ref().map(|r| match r.registration() {
        Registration::Open => "open",
        Registration::Closed => "closed",
    });
    reply::json(
        StatusCode::OK,
        &json!({
            "accounts": api.accounts.is_some(),
            "register": register,
            "tokens_required": api.access.tokens_on(),
            "version": env!("CARGO_PKG_VERSION"),
        }),
    )
}
