//! Roles and grants. A grant is `role` or `role:resource`: `producer:txn` (ingest into view
//! `txn`), `reader:*` (read every view), `predictor:fraud` (predict with model `fraud`),
//! `admin` (traffic, promote, rollback, reloads, keys), `ops` (metrics, the cluster view).
//! A resource of `*` (or none) covers every resource of the role.

use std::fmt;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Producer,
    Reader,
    Predictor,
    Admin,
    Ops,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Producer,
        Role::Reader,
        Role::Predictor,
        Role::Admin,
        Role::Ops,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Reader => "reader",
            Role::Predictor => "predictor",
            Role::Admin => "admin",
            Role::Ops => "ops",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One grant: a role, on every resource (`None`) or one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: Role,
    pub resource: Option<String>,
}

impl Grant {
    /// `role`, `role:*` or `role:resource`.
    pub fn parse(text: &str) -> Result<Grant, String> {
        let (role, resource) = match text.split_once(':') {
            Some((r, res)) => (r, Some(res)),
            None => (text, None),
        };
        let role = Role::parse(role.trim()).ok_or_else(|| {
            format!("unknown role {role:?} in {text:?} (producer, reader, predictor, admin, ops)")
        })?;
        let resource = match resource.map(str::trim) {
            None | Some("*") => None,
            Some("") => return Err(format!("empty resource in {text:?}")),
            Some(r) => Some(r.to_string()),
        };
        Ok(Grant { role, resource })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.resource {
            None => write!(f, "{}:*", self.role),
            Some(r) => write!(f, "{}:{r}", self.role),
        }
    }
}

/// The grants of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    grants: Vec<Grant>,
    /// Everything (auth mode `none`).
    all: bool,
}

impl Grants {
    /// Every role on every resource: what a request gets with `auth.mode = "none"`.
    pub fn everything() -> Grants {
        Grants {
            grants: Vec::new(),
            all: true,
        }
    }

    pub fn parse<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Grants, String> {
        let grants = texts
            .into_iter()
            .map(Grant::parse)
            .collect::<Result<_, _>>()?;
        Ok(Grants { grants, all: false })
    }

    /// Whether `role` is granted on `resource` (`None`: on anything at all — the coarse check
    /// a route makes before it knows which views or models a body names).
    pub fn allows(&self, role: Role, resource: Option<&str>) -> bool {
        self.all
            || self.grants.iter().any(|g| {
                g.role == role
                    && match (&g.resource, resource) {
                        (None, _) | (Some(_), None) => true,
                        (Some(mine), Some(wanted)) => mine == wanted,
                    }
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.grants.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_cover_their_role_and_resource_only() {
        let g = Grants::parse(["producer:txn", "reader:*", "predictor:fraud", "ops"]).unwrap();
        assert!(g.allows(Role::Producer, Some("txn")));
        assert!(!g.allows(Role::Producer, Some("profile")));
        assert!(
            g.allows(Role::Producer, None),
            "the coarse check: some producer grant"
        );
        assert!(g.allows(Role::Reader, Some("anything")));
        assert!(g.allows(Role::Predictor, Some("fraud")));
        assert!(!g.allows(Role::Predictor, Some("churn")));
        assert!(!g.allows(Role::Admin, None));
        assert!(g.allows(Role::Ops, None));
        assert!(Grants::everything().allows(Role::Admin, Some("x")));
        assert!(Grant::parse("owner:*").is_err());
        assert!(Grant::parse("reader:").is_err());
        assert_eq!(Grant::parse("reader").unwrap().to_string(), "reader:*");
    }
}
