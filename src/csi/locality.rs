//! Locality: each node says, in its own labels, how much of each volume it has cached, so that
//! pods can prefer the nodes where their data already is.
//!
//! The label of a volume is `cache.reservoir.csi.dev/NAME = PERCENT`. NAME is the volume's
//! PersistentVolume name (what `kubectl get pvc` shows as VOLUME) when it is a valid label
//! name, else `v-` and the 128-bit hash of the volume id (label names are at most 63
//! characters). PERCENT (1-100) is the share of the volume's data in this node's cache, of its
//! size as the last preload of the whole volume measured it; 1 while its size is unknown and
//! anything is cached. The label stays after the volume is unstaged, as long as its data is
//! in the cache (the next pod is the one that gains), and goes when the data has been evicted.
//! A pod prefers those nodes with a preferred node affinity on the label (docs/kubernetes.md,
//! "Scheduling pods where the data is").
//!
//! [`desired_labels`] and [`label_patch`] decide (tested without a cluster); [`Locality`] is
//! the adapter that keeps what it learned and patches the Node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use super::claims::{ClaimError, Claims, api_call};
use crate::cache::{OwnerTag, OwnerUsage};
use crate::control::DaemonStatus;

/// The prefix of every locality label.
pub const LABEL_PREFIX: &str = "cache.reservoir.csi.dev/";

/// What the node knows of a volume it has served: enough to label it after it is unstaged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Known {
    /// The label name (after the prefix).
    pub label: String,
    /// The volume's cache owner tag (as the daemon's status prints it).
    pub owner: String,
    /// The volume's size as a preload of all of it measured it.
    pub size: Option<u64>,
}

/// Whether `name` is a valid label name (the part after the prefix).
fn is_label_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The label name of a volume: its PersistentVolume's name if that is a valid label name,
/// else a hash of its id.
pub fn label_name(volume_id: &str, volume_name: Option<&str>) -> String {
    match volume_name.filter(|n| is_label_name(n)) {
        Some(name) => name.to_string(),
        None => format!(
            "v-{:032x}",
            xxhash_rust::xxh3::xxh3_128(volume_id.as_bytes())
        ),
    }
}

/// The label value for `cached` bytes of a volume of `size` bytes (`None`: unknown); `None`
/// when nothing is cached.
pub fn percent(cached: u64, size: Option<u64>) -> Option<u64> {
    if cached == 0 {
        return None;
    }
    Some(match size {
        Some(size) if size > 0 => (cached.saturating_mul(100) / size).clamp(1, 100),
        _ => 1,
    })
}

/// Learns from the daemon's status: volumes staged now (inline volumes, which no later pod can
/// reuse, are left out) and the size a finished preload of all of a volume measured. `label`
/// names a volume seen for the first time.
pub fn learn(
    known: &mut BTreeMap<String, Known>,
    status: &DaemonStatus,
    mut label: impl FnMut(&str) -> String,
) {
    for volume in &status.volumes {
        if volume
            .target_path
            .components()
            .any(|c| c.as_os_str() == "pods")
        {
            continue;
        }
        let entry = known
            .entry(volume.volume_id.clone())
            .or_insert_with(|| Known {
                label: label(&volume.volume_id),
                owner: OwnerTag::of(&volume.volume_id).to_string(),
                size: None,
            });
        if let Some(preload) = &volume.volume.preload
            && preload.done
            && !preload.scanning
            && preload.paths.iter().any(|p| p.trim_matches('/').is_empty())
        {
            entry.size = Some(preload.bytes_total);
        }
    }
}

/// The locality labels the node should carry, from what it knows and the cache's owners;
/// volumes whose data is all gone are forgotten.
pub fn desired_labels(
    known: &mut BTreeMap<String, Known>,
    owners: &[OwnerUsage],
) -> BTreeMap<String, String> {
    let cached = |owner: &str| {
        owners
            .iter()
            .find(|o| o.tag == owner)
            .map_or(0, |o| o.data_bytes)
    };
    known.retain(|_, k| cached(&k.owner) > 0);
    known
        .values()
        .filter_map(|k| {
            let value = percent(cached(&k.owner), k.size)?;
            Some((format!("{LABEL_PREFIX}{}", k.label), value.to_string()))
        })
        .collect()
}

/// The merge patch that turns the node's locality labels into `desired` (others untouched);
/// `None` when they already are.
pub fn label_patch(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> Option<serde_json::Value> {
    let mut labels = serde_json::Map::new();
    for (key, value) in current.iter().filter(|(k, _)| k.starts_with(LABEL_PREFIX)) {
        match desired.get(key) {
            Some(wanted) if wanted == value => {}
            Some(wanted) => {
                labels.insert(key.clone(), wanted.clone().into());
            }
            None => {
                labels.insert(key.clone(), serde_json::Value::Null);
            }
        }
    }
    for (key, value) in desired {
        if !current.contains_key(key) {
            labels.insert(key.clone(), value.clone().into());
        }
    }
    (!labels.is_empty()).then(|| serde_json::json!({"metadata": {"labels": labels}}))
}

/// Keeps this node's locality labels in step with its cache.
pub struct Locality {
    node: String,
    driver: String,
    /// Where what the node knows is kept across restarts of the node service.
    state: PathBuf,
    known: Mutex<Option<BTreeMap<String, Known>>>,
}

impl Locality {
    pub fn new(node: String, driver: String, state: PathBuf) -> Locality {
        Locality {
            node,
            driver,
            state,
            known: Mutex::new(None),
        }
    }

    /// One round: learn from `status`, then patch the node's labels if they differ.
    #[tracing::instrument(skip_all)]
    pub async fn refresh(&self, claims: &Claims, status: &DaemonStatus) -> Result<(), ClaimError> {
        let what = format!("node {}", self.node);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut known = match known.take() {
            Some(known) => known,
            None => std::fs::read(&self.state)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default(),
        };
        let before = known.clone();
        let new_volumes: Vec<String> = status
            .volumes
            .iter()
            .map(|v| v.volume_id.clone())
            .filter(|id| !known.contains_key(id))
            .collect();
        let client = claims.client(&what).await?;
        let mut names = BTreeMap::new();
        if !new_volumes.is_empty() {
            let volumes: Api<PersistentVolume> = Api::all(client.clone());
            for volume in api_call(&what, volumes.list(&ListParams::default()))
                .await?
                .items
            {
                let Some(csi) = volume.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
                    continue;
                };
                if csi.driver == self.driver && new_volumes.contains(&csi.volume_handle) {
                    names.insert(csi.volume_handle.clone(), volume.metadata.name.clone());
                }
            }
        }
        learn(&mut known, status, |id| {
            label_name(id, names.get(id).and_then(|n| n.as_deref()))
        });
        let desired = desired_labels(&mut known, &status.owners);
        let nodes: Api<Node> = Api::all(client);
        let node = api_call(&what, nodes.get(&self.node)).await?;
        let current = node.metadata.labels.unwrap_or_default();
        if let Some(patch) = label_patch(&current, &desired) {
            tracing::info!(labels = %patch, "locality labels");
            api_call(
                &what,
                nodes.patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        }
        if known != before
            && let Ok(text) = serde_json::to_vec(&known)
        {
            let partial = self.state.with_extension("partial");
            let written = std::fs::create_dir_all(self.state.parent().unwrap_or(&self.state))
                .and_then(|()| std::fs::write(&partial, text))
                .and_then(|()| std::fs::rename(&partial, &self.state));
            if let Err(e) = written {
                tracing::warn!(state = %self.state.display(), error = %e, "cannot keep the locality state");
            }
        }
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some(known);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_fit_kubernetes() {
        assert_eq!(
            label_name("id", Some("pvc-6afbb3f0-6edb-412f-9799-225c66f3ad23")),
            "pvc-6afbb3f0-6edb-412f-9799-225c66f3ad23"
        );
        let long = "x".repeat(64);
        for name in [
            None,
            Some(long.as_str()),
            Some("-bad"),
            Some("a/b"),
            Some(""),
        ] {
            let label = label_name("pvc-1234-0123456789abcdef0123456789abcdef", name);
            assert!(label.starts_with("v-") && label.len() == 34, "{label}");
            assert!(is_label_name(&label));
        }
        assert_ne!(label_name("a", None), label_name("b", None));
    }

    #[test]
    fn percent_is_of_the_measured_size() {
        assert_eq!(percent(0, Some(100)), None);
        assert_eq!(percent(50, Some(100)), Some(50));
        assert_eq!(
            percent(1, Some(1000)),
            Some(1),
            "anything cached is at least 1"
        );
        assert_eq!(percent(200, Some(100)), Some(100));
        assert_eq!(percent(5, None), Some(1));
    }

    fn owner(tag: &str, data_bytes: u64) -> OwnerUsage {
        serde_json::from_value(serde_json::json!({
            "name": null, "tag": tag, "quota": null, "used": data_bytes, "data_bytes": data_bytes,
            "files": 1, "complete_files": 1, "admitted": 1, "rejected": 0, "evicted_files": 0,
            "evicted_bytes": 0,
        }))
        .unwrap()
    }

    #[test]
    fn labels_follow_the_cache_and_go_with_the_data() {
        let mut known = BTreeMap::from([
            (
                "a".to_string(),
                Known {
                    label: "pv-a".into(),
                    owner: "01".into(),
                    size: Some(1000),
                },
            ),
            (
                "b".to_string(),
                Known {
                    label: "pv-b".into(),
                    owner: "02".into(),
                    size: None,
                },
            ),
        ]);
        let desired = desired_labels(&mut known, &[owner("01", 900), owner("02", 10)]);
        assert_eq!(desired[&format!("{LABEL_PREFIX}pv-a")], "90");
        assert_eq!(desired[&format!("{LABEL_PREFIX}pv-b")], "1");
        // b's data evicted: its label goes, and the node forgets it.
        let desired = desired_labels(&mut known, &[owner("01", 300)]);
        assert_eq!(desired.len(), 1);
        assert_eq!(desired[&format!("{LABEL_PREFIX}pv-a")], "30");
        assert!(!known.contains_key("b"));

        let current = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), "n".to_string()),
            (format!("{LABEL_PREFIX}pv-a"), "90".to_string()),
            (format!("{LABEL_PREFIX}pv-b"), "1".to_string()),
        ]);
        let patch = label_patch(&current, &desired).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({"metadata": {"labels": {
                format!("{LABEL_PREFIX}pv-a"): "30",
                format!("{LABEL_PREFIX}pv-b"): null,
            }}})
        );
        let mut applied = current.clone();
        applied.insert(format!("{LABEL_PREFIX}pv-a"), "30".into());
        applied.remove(&format!("{LABEL_PREFIX}pv-b"));
        assert_eq!(label_patch(&applied, &desired), None, "nothing to change");
    }
}
