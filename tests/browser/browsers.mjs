// How the tests start each browser with WebGPU on this kind of machine (see
// ../shared/notes/environment.md): shared by run.mjs (kernel tests) and e2e.mjs (the app).

export const CHROMIUM_ARGS = [
  '--headless=new',
  '--no-sandbox', // we run as root
  '--enable-unsafe-webgpu', // no adapter on Linux without it
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
  '--disable-default-apps',
  '--disable-features=Translate,MediaRouter,OptimizationHints',
  '--disable-renderer-backgrounding',
  '--disable-background-timer-throttling',
  '--disable-backgrounding-occluded-windows',
];

export const FIREFOX_PREFS = {
  'dom.webgpu.enabled': true,
  'gfx.webgpu.ignore-blocklist': true, // no adapter (lavapipe is blocklisted) without it
  'app.update.enabled': false,
  'browser.shell.checkDefaultBrowser': false,
  'datareporting.policy.dataSubmissionEnabled': false,
  'toolkit.telemetry.enabled': false,
  'network.captive-portal-service.enabled': false,
  'network.connectivity-service.enabled': false,
  'extensions.update.enabled': false,
  'browser.safebrowsing.malware.enabled': false,
  'browser.safebrowsing.phishing.enabled': false,
};

export const EXECUTABLES = {
  chromium: process.env.LDM_CHROMIUM ?? '/usr/bin/chromium',
  firefox: process.env.LDM_FIREFOX ?? '/usr/bin/firefox-esr',
};
