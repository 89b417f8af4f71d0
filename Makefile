# Ambient mesh: operator, control plane, ztunnel, waypoint.
# Kubebuilder-shaped targets; every tool is a pinned Go tool (hack/tools/go.mod)
# built into bin/, so nothing needs a global install.

IMG ?= ambient/manager:dev
TAG ?= dev
VERSION ?= 0.1.0
K8S_VERSION ?= 1.36.3
BIN := $(CURDIR)/bin
ENVTEST_ASSETS := $(BIN)/k8s/$(K8S_VERSION)
GO_TEST_FLAGS ?= -count=1
export KUBEBUILDER_ASSETS := $(ENVTEST_ASSETS)
export PATH := $(BIN):$(PATH)

CONTROLLER_GEN := $(BIN)/controller-gen
KUSTOMIZE := $(BIN)/kustomize
PROTOC_GEN_GO := $(BIN)/protoc-gen-go

.PHONY: all
all: build

##@ General
.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development
.PHONY: tools
tools: $(CONTROLLER_GEN) $(KUSTOMIZE) $(PROTOC_GEN_GO) ## Build the pinned Go tools into bin/.
$(CONTROLLER_GEN) $(KUSTOMIZE) $(PROTOC_GEN_GO) &: hack/tools/go.mod hack/tools/go.sum
	cd hack/tools && GOBIN=$(BIN) go install tool

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate CRDs, RBAC and webhook manifests.
	$(CONTROLLER_GEN) rbac:roleName=manager-role crd webhook paths="./api/..." paths="./controllers/..." output:crd:artifacts:config=config/crd/bases

.PHONY: generate
generate: $(CONTROLLER_GEN) ## Generate deepcopy code, protobuf code and the API reference.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./api/..."
	hack/gen-proto.sh
	go run ./hack/apidocs > docs/api-reference.md

.PHONY: gen-check
gen-check: manifests generate bundle ## Fail when generated code or manifests are stale.
	@git diff --exit-code -- api config docs/api-reference.md bundle proxylib controllers || \
		{ echo "generated files are stale: run 'make manifests generate bundle' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- api config bundle proxylib controllers)" || \
		{ git status --porcelain -- api config bundle proxylib controllers; echo "untracked generated files"; exit 1; }

.PHONY: fmt
fmt: ## Run go fmt.
	go fmt ./...

.PHONY: vet
vet: ## Run go vet.
	go vet ./...

.PHONY: envtest
envtest: ## Build kube-apiserver and etcd for envtest into bin/ (once; cached).
	hack/build-envtest.sh kube-apiserver etcd

.PHONY: test
test: manifests generate fmt vet envtest test-unit e2e ## The whole suite: unit, envtest, network-namespace and end-to-end tests.

.PHONY: test-unit
test-unit: envtest ## Unit, envtest and network-namespace tests (namespaced tests need root).
	go test $(GO_TEST_FLAGS) ./...
	cd test/interop && go test $(GO_TEST_FLAGS) ./...

.PHONY: fuzz
fuzz: ## Run every fuzz target briefly.
	hack/fuzz.sh 20s

.PHONY: bench
bench: build ## Benchmarks with same-run baselines (results go to docs/performance.md by hand).
	hack/bench.sh

##@ Build
.PHONY: build
build: ## Build every binary into bin/.
	CGO_ENABLED=0 go build -trimpath -o $(BIN)/ ./cmd/...

.PHONY: run
run: manifests generate ## Run the manager against the current kubeconfig.
	go run ./cmd/manager

.PHONY: images
images: build ## Build OCI image tarballs (no Docker needed) into bin/images/.
	go run ./hack/images -tag $(TAG) -out $(BIN)/images

##@ Deployment
.PHONY: install
install: manifests $(KUSTOMIZE) ## Install CRDs into the cluster of the current kubeconfig.
	$(KUSTOMIZE) build config/crd | kubectl apply --server-side -f -

.PHONY: uninstall
uninstall: manifests $(KUSTOMIZE) ## Remove the CRDs.
	$(KUSTOMIZE) build config/crd | kubectl delete --ignore-not-found -f -

.PHONY: deploy
deploy: manifests $(KUSTOMIZE) ## Deploy the operator with image IMG.
	cd config/manager && $(KUSTOMIZE) edit set image controller=$(IMG)
	$(KUSTOMIZE) build config/default | kubectl apply --server-side -f -

.PHONY: undeploy
undeploy: $(KUSTOMIZE) ## Remove the operator.
	$(KUSTOMIZE) build config/default | kubectl delete --ignore-not-found -f -

.PHONY: build-installer
build-installer: manifests $(KUSTOMIZE) ## Write dist/install.yaml.
	mkdir -p dist
	$(KUSTOMIZE) build config/default > dist/install.yaml

.PHONY: bundle
bundle: manifests $(KUSTOMIZE) ## Write the OLM bundle (bundle/, bundle.Dockerfile).
	go run ./hack/bundle -version $(VERSION) -img $(IMG)

##@ Lab
.PHONY: lab-up
lab-up: ## Bring up the multi-node lab cluster.
	test/lab/lab.sh up

.PHONY: lab-down
lab-down: ## Tear the lab down completely.
	test/lab/lab.sh down

.PHONY: demo
demo: ## The main job: bring up the lab and replay the ambient journey.
	test/lab/demo.sh

.PHONY: e2e
e2e: ## End-to-end suite in the lab.
	test/lab/e2e.sh
